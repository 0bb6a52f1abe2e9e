"""Tokenizers rebuilt from their specs: char, GPT-2's format through real tiktoken code (with
vocabulary files these tests write, never downloaded), and a trained byte-level BPE."""

import base64
import json
import pickle

import pytest
import tiktoken
import tiktoken.load

from fastgpt import tokenizers
from fastgpt.data import CharTokenizer, read_text
from fastgpt.errors import FastGPTError
from fastgpt.tokenizers import (gpt2_from_file, infer_spec, load_tokenizer,
                                parse_tokenizer_choice, train_bpe)

MERGES = [b"th", b"e ", b" t", b"the", b" the", b"ou", b"in", b"an", b"er", b", "]
SAMPLES = ["", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "tabs\tand  double  spaces \n\n\n trailing ", "é ü 😀 ∑ 中文", "a <|endoftext|> b",
           "\u00a0non-breaking\u2003em space\u2028line sep"]


def small_gpt2_file(folder, merges=MERGES):
    """A GPT-2-format .tiktoken rank file: the 256 bytes (rank = byte value), then ``merges``."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in merges:
        ranks[token] = len(ranks)
    path = folder / "small.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def _byte_to_char():
    """GPT-2's data-gym alphabet: printable bytes stand for themselves, others for 256+n."""
    kept = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(moved)}}, \
        kept + moved


def small_gpt2_folder(folder):
    """The same vocabulary as GPT-2's own file pair: vocab.bpe (merges) + encoder.json."""
    char, order = _byte_to_char()

    def gym(token):
        return "".join(char[b] for b in token)
    merges = [(b"t", b"h"), (b"e", b" "), (b" ", b"t"), (b"th", b"e"), (b" t", b"he")]
    encoder = {gym(bytes([b])): i for i, b in enumerate(order)}
    for a, b in merges:
        encoder[gym(a + b)] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{gym(a)} {gym(b)}\n"
                                                                  for a, b in merges))
    (folder / "encoder.json").write_text(json.dumps(encoder))
    return folder


def _rebuilt(tokenizer):
    return load_tokenizer(json.loads(json.dumps(tokenizer.spec)))   # through JSON, as stored


def test_char_is_fastgpt_data_s_char_tokenizer_with_a_spec():
    text = read_text()
    reference = CharTokenizer.from_text(text)
    tok = load_tokenizer({"kind": "char", "chars": reference.chars})
    assert isinstance(tok, CharTokenizer)
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("char", 65, None)
    assert tok.encode(text[:500]) == reference.encode(text[:500])
    assert tok.encode_batch([text[:50], "", text[-9:]]) == \
        [reference.encode(text[:50]), [], reference.encode(text[-9:])]
    assert _rebuilt(tok).chars == reference.chars
    assert tok.decode(tok.encode(text[:1000])) == text[:1000]


def test_gpt2_format_rank_file_through_tiktoken(tmp_path):
    tok = gpt2_from_file(small_gpt2_file(tmp_path))
    n = 256 + len(MERGES)
    assert (tok.vocab_size, tok.eot_id, tok.name) == (n + 1, n, f"gpt2-format:{n + 1}")
    assert tok.encode("the") == [256 + MERGES.index(b"the")]
    assert tok.encode(" the") == [256 + MERGES.index(b" the")]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert n not in tok.encode("<|endoftext|>")    # text, never the end-of-text token
    # the spec holds the ranks: the file is no longer needed
    spec = tok.spec
    (tmp_path / "small.tiktoken").unlink()
    again = load_tokenizer(json.loads(json.dumps(spec)))
    assert again.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_gpt2_format_file_pair_through_tiktoken(tmp_path):
    folder = small_gpt2_folder(tmp_path)
    tok = gpt2_from_file(folder)
    assert tok.vocab_size == 262 and tok.eot_id == 261
    assert tok.encode(" the") == [260] and tok.decode([260]) == " the"
    assert gpt2_from_file(folder / "vocab.bpe").encode(" the") == [260]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert _rebuilt(tok).encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_bad_gpt2_files(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(FastGPTError, match="lacks encoder.json"):
        gpt2_from_file(tmp_path / "folder")
    (tmp_path / "bad.tiktoken").write_text("dGg= 0\nnot-a-line\n")
    with pytest.raises(FastGPTError, match="line 2 is not '<base64 token> <rank>'"):
        gpt2_from_file(tmp_path / "bad.tiktoken")
    (tmp_path / "few.tiktoken").write_text("YQ== 0\n")
    with pytest.raises(FastGPTError, match="needs ranks 0..n-1, one per token, the 256 single"):
        gpt2_from_file(tmp_path / "few.tiktoken")
    with pytest.raises(FastGPTError, match="does not exist"):
        gpt2_from_file(tmp_path / "none.tiktoken")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No tiktoken cache, and any download fails at once (counted) instead of reaching out."""
    attempts, read_local = [], tiktoken.load.read_file

    def no_network(url):
        if "://" not in url:
            return read_local(url)
        attempts.append(url)
        raise ConnectionError(f"no network in this test: {url}")
    (tmp_path / "empty-cache").mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    return attempts


def test_gpt2_offline_without_cache_or_file_is_one_clear_error(offline):
    with pytest.raises(FastGPTError) as e:
        load_tokenizer({"kind": "gpt2"})
    message = str(e.value)
    assert "\n" not in message
    assert "tiktoken has no cached copy and could not download one" in message
    assert "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files" in message
    assert "or pass --tokenizer-file PATH" in message
    assert offline and all(url.startswith("https://openaipublic") for url in offline)


def test_gpt2_s_own_files_are_recorded_by_path_not_inlined(tmp_path, monkeypatch, offline):
    # stand-in: this small file plays GPT-2's .tiktoken (its sha256 is taken as GPT-2's)
    path = small_gpt2_file(tmp_path)
    monkeypatch.setitem(tokenizers.GPT2_FILE_SHA256, ".tiktoken", tokenizers._sha256(path))
    tok = gpt2_from_file(path)
    assert tok.spec == {"kind": "gpt2", "file": str(path.resolve())} and tok.name == "gpt2"
    assert _rebuilt(tok).encode(" the") == tok.encode(" the")     # through the recorded path
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(FastGPTError, match="does not hold GPT-2's vocabulary"):
        load_tokenizer(tok.spec, tokenizer_file=small_gpt2_folder(other))
    moved = path.rename(tmp_path / "moved.tiktoken")
    assert load_tokenizer(tok.spec, tokenizer_file=moved).encode("the") == tok.encode("the")
    with pytest.raises(FastGPTError, match="the file '.*small.tiktoken' it was built from is "
                                           "gone, and tiktoken has no cached copy"):
        load_tokenizer(tok.spec)


def test_trained_byte_level_bpe():
    text = read_text()[:100_000]
    tok = train_bpe(300, iter([text[:50_000], text[50_000:]]))
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bpe:300", 300, 0)
    assert tok.spec["kind"] == "bpe" and tok.spec["vocab_size"] == 300
    for sample in SAMPLES + [text[:3000]]:
        assert tok.decode(tok.encode(sample)) == sample
    assert 0 not in tok.encode("<|endoftext|>")      # text, never the end-of-text token
    assert len(tok.encode(text[:3000])) < 3000 * 0.8   # merges happened
    again = _rebuilt(tok)
    assert again.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    assert again.decode([0]) == "<|endoftext|>"
    # as worker processes get it under spawn or forkserver
    assert pickle.loads(pickle.dumps(tok)).encode_batch(SAMPLES) == again.encode_batch(SAMPLES)


@pytest.mark.parametrize("choice,expected", [("char", ("char", None)), ("gpt2", ("gpt2", None)),
                                             ("bpe:257", ("bpe", 257)),
                                             ("bpe:50000", ("bpe", 50000))])
def test_tokenizer_choices(choice, expected):
    assert parse_tokenizer_choice(choice) == expected


@pytest.mark.parametrize("choice,match", [
    ("gpt3", "unknown tokenizer 'gpt3'; choose one of: char, gpt2, bpe:N"),
    ("bpe", "unknown tokenizer 'bpe'"), ("bpe:x", "unknown tokenizer 'bpe:x'"),
    ("bpe:256", "bpe:256: a byte-level BPE needs at least 257 tokens (256 bytes and the "
                "end-of-text token); got 256")])
def test_bad_tokenizer_choices(choice, match):
    with pytest.raises(FastGPTError, match=match.replace("(", r"\(").replace(")", r"\)")):
        parse_tokenizer_choice(choice)


def test_infer_spec_for_shards_without_meta():
    assert infer_spec(50257) == {"kind": "gpt2"} and infer_spec(65) == {"kind": "gpt2"}
    assert infer_spec(50258) is None and infer_spec(128256) is None


def test_unknown_spec():
    with pytest.raises(FastGPTError, match="unknown tokenizer spec"):
        load_tokenizer({"kind": "sentencepiece"})


def test_char_and_gpt2_format_survive_pickling(tmp_path):
    # worker processes started by spawn or forkserver get the tokenizer pickled
    for tok in (load_tokenizer({"kind": "char", "chars": "".join(sorted(set("".join(SAMPLES))))}),
                gpt2_from_file(small_gpt2_file(tmp_path))):
        again = pickle.loads(pickle.dumps(tok))
        assert again.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES) and again.spec == tok.spec
