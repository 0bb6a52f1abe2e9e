"""Reading text, the character tokenizer and batch sampling."""

import hashlib

import pytest
import torch

from fastgpt.data import CharTokenizer, TextDataset, bundled_text_path, read_text
from fastgpt.errors import FastGPTError


def test_bundled_text_is_tiny_shakespeare():
    raw = bundled_text_path().read_bytes()
    assert len(raw) == 1115394
    assert hashlib.sha256(raw).hexdigest().startswith("86c4e6aa")
    assert CharTokenizer.from_text(read_text()).vocab_size == 65


def test_tokenizer_round_trip_and_unknown_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("low hell")) == "low hell"
    with pytest.raises(FastGPTError, match=r"2 character\(s\) not in the model's vocabulary: 'X', 'z'"):
        tok.encode("hello Xz")


@pytest.mark.parametrize("text", ["", "a", "hello world\n", "Grüße, €5 😀 ok", None])
def test_encode_tensor_is_encode(text):
    text = read_text() if text is None else text
    tok = CharTokenizer.from_text(text or "a")
    ids = tok.encode_tensor(text)
    assert ids.dtype == torch.int64 and ids.tolist() == tok.encode(text)


def test_encode_tensor_names_unknown_characters():
    tok = CharTokenizer.from_text("ab€")
    # one below and one above every code point of the vocabulary
    with pytest.raises(FastGPTError, match=r"2 character\(s\) not in the model's vocabulary: ' ', '😀'"):
        tok.encode_tensor("a €😀b")


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"abc\xff\xfedef", "not UTF-8 text: byte 0xff at offset 3"),
])
def test_bad_data_files(tmp_path, content, match):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FastGPTError, match=match):
        read_text(path)


def test_text_too_short_for_block_size():
    with pytest.raises(FastGPTError, match="block_size 64 needs at least 65 per split"):
        TextDataset("abcdefgh" * 20, CharTokenizer.from_text("abcdefgh"), block_size=64)


def test_batches_are_next_token_windows():
    text = "".join(chr(ord("a") + i % 26) for i in range(2000))
    tok = CharTokenizer.from_text(text)
    data = TextDataset(text, tok, block_size=10)
    x, y = data.batch("train", 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 26, y)          # the alphabet text: next char = +1
