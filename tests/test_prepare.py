"""`fastgpt prepare`: shards and meta.json from text, JSON lines and folders; the documented
separator and split rules; workers; and bad input (one line, exit 2, nothing written)."""

import json

import numpy as np
import pytest

from fastgpt import shards
from fastgpt.cli import main
from fastgpt.data import CharTokenizer, bundled_text_path, read_text
from fastgpt.prepare import PrepareOptions, cut_pieces, prepare
from fastgpt.shards import find_shards, open_shard, read_meta
from fastgpt.tokenizers import gpt2_from_file, load_tokenizer, train_bpe
from test_tokenizers import SAMPLES, offline, small_gpt2_file  # noqa: F401 (a fixture)

SHAKESPEARE = str(bundled_text_path())


def _stream(out):
    """{"val": tokens, "train": tokens}, each split's shards in order, and the meta.json."""
    found = find_shards(out)
    return {split: np.concatenate([open_shard(p) for p in paths]).tolist()
            for split, paths in found.items()}, read_meta(out)


def _prepare(out, *inputs, tokenizer, **options):
    options.setdefault("progress", False)
    return prepare(PrepareOptions(inputs=[str(i) for i in inputs], tokenizer=tokenizer,
                                  out_dir=str(out), **options))


def test_char_on_shakespeare_is_nanogpt_s_shakespeare_char(tmp_path):
    text = read_text()
    _prepare(tmp_path / "sc", SHAKESPEARE, tokenizer="char", val_fraction=0.1)
    tokens, meta = _stream(tmp_path / "sc")
    reference = CharTokenizer.from_text(text)
    assert meta["tokenizer"] == {"kind": "char", "chars": reference.chars}
    assert meta["vocab_size"] == 65 and meta["eot_id"] is None and meta["documents"] == 1
    n_val = round(0.1 * len(text))
    assert tokens["val"] + tokens["train"] == reference.encode_tensor(text).tolist()
    assert len(tokens["val"]) == n_val == meta["tokens"]["val"] == meta["val_characters"]
    assert meta["shards"] == {"val": ["sc_val_000000.bin"], "train": ["sc_train_000001.bin"]}
    tok = load_tokenizer(meta["tokenizer"])
    assert tok.decode(tokens["val"][:200]) == text[:200]


def test_bpe_on_shakespeare_decodes_back_to_the_text(tmp_path):
    text = read_text()
    result = _prepare(tmp_path / "b", SHAKESPEARE, tokenizer="bpe:512", shard_tokens=100_000)
    tokens, meta = _stream(tmp_path / "b")
    tok = load_tokenizer(meta["tokenizer"])
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bpe:512", 512, 0) == \
        (result.tokenizer.name, meta["vocab_size"], meta["eot_id"])
    stream = tokens["val"] + tokens["train"]
    assert stream[0] == 0 and 0 not in stream[1:]           # end-of-text before the document
    assert tok.decode(stream[1:]) == text
    assert tok.decode(tokens["val"][1:]) == text[:8192]     # at least 8192 characters of val
    assert len(meta["shards"]["train"]) == 6 and meta["shards"]["train"][0] == "b_train_000001.bin"
    assert all(shards.shard_token_count(tmp_path / "b" / n) == 100_000
               for n in meta["shards"]["train"][:-1])
    for sample in SAMPLES:
        assert tok.decode(tok.encode(sample)) == sample


def _documents_folder(tmp_path):
    """Four documents: a folder's a.txt and sub/b.txt (c.txt is empty: skipped), two JSON lines."""
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("the first document, the end")
    (folder / "sub" / "b.txt").write_text("Éh  then\n\nthe second\n")
    (folder / "c.txt").write_text("")
    (folder / "skip.md").write_text("not a .txt")
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"text": "third: <|endoftext|> as text", "id": 3}\n\n'
                     '{"text": "fourth \\u00e9 the"}\n')
    texts = ["the first document, the end", "Éh  then\n\nthe second\n",
             "third: <|endoftext|> as text", "fourth é the"]
    return folder, lines, texts


def test_end_of_text_before_each_document_and_val_first(tmp_path):
    folder, lines, texts = _documents_folder(tmp_path)
    tok = gpt2_from_file(small_gpt2_file(tmp_path))
    _prepare(tmp_path / "o", folder, lines, tokenizer="gpt2",
             tokenizer_file=str(tmp_path / "small.tiktoken"), val_fraction=0.6)
    tokens, meta = _stream(tmp_path / "o")
    whole = "".join(texts)
    v = round(0.6 * len(whole))       # above the floor (half the text): the fraction rules
    assert meta["val_characters"] == v and meta["documents"] == 4
    expected = []
    seen = 0
    for text in texts:               # the val cut falls inside the third document
        expected.append(tok.eot_id)
        if seen < v < seen + len(text):
            expected += tok.encode(text[:v - seen]) + tok.encode(text[v - seen:])
        else:
            expected += tok.encode(text)
        seen += len(text)
    assert tokens["val"] + tokens["train"] == expected
    assert tok.decode(tokens["val"]) == "<|endoftext|>" + texts[0] + "<|endoftext|>" + \
        texts[1] + "<|endoftext|>" + whole[len(texts[0] + texts[1]):v]
    assert meta["inputs"] == [str(folder / "a.txt"), str(folder / "c.txt"),
                              str(folder / "sub" / "b.txt"), str(lines)]   # sorted by path
    assert load_tokenizer(meta["tokenizer"]).encode(whole) == tok.encode(whole)


def test_char_separates_documents_by_a_blank_line(tmp_path):
    folder, lines, texts = _documents_folder(tmp_path)
    _prepare(tmp_path / "o", folder, lines, tokenizer="char")
    tokens, meta = _stream(tmp_path / "o")
    tok = load_tokenizer(meta["tokenizer"])
    assert tok.decode(tokens["val"] + tokens["train"]) == "\n\n".join(texts)
    assert meta["vocab_size"] == len(set("\n".join(texts)))


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe"])
def test_pieces_encode_as_the_whole_document(tmp_path, tokenizer):
    # cut before a " " or "\n" that follows a non-space: GPT-2's regex splits there anyway
    text = " ".join(SAMPLES) * 3 + read_text()[:20_000] + "  \n \t x\u3000y\u00a0 z  "
    tok = (gpt2_from_file(small_gpt2_file(tmp_path)) if tokenizer == "gpt2"
           else train_bpe(400, [read_text()[:50_000]]))
    for piece_chars in (7, 50, 1000):
        pieces = list(cut_pieces([text[i:i + 333] for i in range(0, len(text), 333)],
                                 piece_chars))
        assert "".join(pieces) == text and len(pieces) > len(text) // (3 * piece_chars)
        assert sum(tok.encode_batch(pieces), []) == tok.encode(text)


def test_workers_write_the_same_shards_as_one_process(tmp_path):
    folder, lines, _ = _documents_folder(tmp_path)
    small_gpt2_file(tmp_path)
    common = dict(tokenizer="gpt2", tokenizer_file=str(tmp_path / "small.tiktoken"),
                  piece_chars=5000, shard_tokens=40_000, val_fraction=0.05)
    for workers in (1, 2):
        _prepare(tmp_path / f"w{workers}", folder, SHAKESPEARE, lines, workers=workers, **common)
    one, two = (sorted((tmp_path / f"w{w}").iterdir()) for w in (1, 2))
    assert [p.name.replace("w1", "w2") for p in one] == [p.name for p in two]
    assert len(one) > 10
    for a, b in zip(one, two):
        if a.suffix == ".bin":
            assert a.read_bytes() == b.read_bytes(), a.name
    meta = json.loads((tmp_path / "w2" / "meta.json").read_text())
    assert meta["documents"] == 5 and meta["tokens"]["val"] > 0


def test_overwrite_replaces_every_old_shard(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["prepare", SHAKESPEARE, "--tokenizer", "char", "--out", str(out), "--no-progress",
            "--workers", "1"]
    assert main(argv + ["--shard-tokens", "300K"]) == 0
    assert "1 document(s) -> 1,107,202 train + 8,192 val tokens (char, vocabulary 65) in 5 " \
           "shard(s)" in capsys.readouterr().out
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "o_train_000001.bin",
                                                     "o_val_000000.bin"]


def _nothing_written(tmp_path, capsys, argv, match, out=None):
    out = out or tmp_path / "out"
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.exists()
    code = main(["prepare", *argv, "--out", str(out), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fastgpt: error: ") and err.count("\n") == 1, err    # one line
    assert match in err, err
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.exists()) == before


def test_bad_inputs_write_nothing(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("")
    (bad / "latin1.txt").write_bytes("é".encode("utf-8") * 700 + b"caf\xe9")
    (bad / "no_text.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    (bad / "not_json.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
    (bad / "number.jsonl").write_text('{"text": 5}\n')
    (bad / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (bad / "empty_folder").mkdir()
    text = [str(bad / "empty.txt")]
    cases = [
        (text + ["--tokenizer", "char"], "the inputs hold 0 character(s) of text"),
        ([str(bad / "latin1.txt"), "--tokenizer", "char"],
         f"input '{bad / 'latin1.txt'}' is not UTF-8 text: byte 0xe9 at offset 1403"),
        ([str(bad / "no_text.jsonl"), "--tokenizer", "char"],
         f"input '{bad / 'no_text.jsonl'}' line 2 has no \"text\" field"),
        ([str(bad / "not_json.jsonl"), "--tokenizer", "char"],
         f"input '{bad / 'not_json.jsonl'}' line 3 is not JSON"),
        ([str(bad / "number.jsonl"), "--tokenizer", "char"], "line 1: its \"text\" is a int"),
        ([str(bad / "latin1.jsonl"), "--tokenizer", "char"],
         "line 2 is not UTF-8 text: byte 0xe9 at offset 28"),
        ([str(bad / "empty_folder"), "--tokenizer", "char"], "holds no .txt files"),
        ([str(bad / "missing.txt"), "--tokenizer", "char"], "missing.txt' does not exist"),
        ([SHAKESPEARE, "--tokenizer", "bpe:5000000000"],
         "a vocabulary of 5,000,000,000 tokens does not fit llm.c's shard format"),
        ([SHAKESPEARE, "--tokenizer", "gpt3"], "unknown tokenizer 'gpt3'; choose one of: char, "
                                               "gpt2, bpe:N"),
        ([SHAKESPEARE, "--tokenizer", "bpe:100"], "bpe:100: a byte-level BPE needs at least 257"),
        ([SHAKESPEARE, "--tokenizer", "char", "--tokenizer-file", "x"],
         "--tokenizer char does not take one"),
        ([SHAKESPEARE, "--tokenizer", "char", "--val-fraction", "1"], "--val-fraction 1.0: give"),
        ([SHAKESPEARE, "--tokenizer", "char", "--shard-tokens", "1.5K7"], "--shard-tokens '1.5K7'"),
        ([SHAKESPEARE, "--tokenizer", "char", "--shard-tokens", "3G"], "from 1 to 2,147,483,647"),
    ]
    for argv, match in cases:
        _nothing_written(tmp_path, capsys, argv, match)


def test_a_bad_byte_deep_in_a_long_file_names_its_offset(tmp_path):
    # many small reads, a multi-byte character cut by a read, the bad byte far from the start
    path = tmp_path / "long.txt"
    path.write_bytes("aé€😀 ".encode("utf-8") * 1000 + b"\xff")
    with pytest.raises(ValueError, match=r"byte 0xff at offset 11000 cannot"):
        _prepare(tmp_path / "o", path, tokenizer="char", piece_chars=7)
    assert not (tmp_path / "o").exists()


def test_an_output_folder_with_shards_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    shards.write_shard(out / "fineweb_train_000001.bin", np.arange(5), 65)
    _nothing_written(tmp_path, capsys, [SHAKESPEARE, "--tokenizer", "char"],
                     "already holds 1 shard file(s) or meta.json (e.g. fineweb_train_000001.bin);"
                     " pass --overwrite", out=out)
    (tmp_path / "file").write_text("x")
    _nothing_written(tmp_path, capsys, [SHAKESPEARE, "--tokenizer", "char"], "is a file, not a "
                     "folder", out=tmp_path / "file")


def test_gpt2_offline_writes_nothing(tmp_path, capsys, offline):  # noqa: F811 (the fixture)
    _nothing_written(tmp_path, capsys, [SHAKESPEARE, "--tokenizer", "gpt2"],
                     "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files, or "
                     "pass --tokenizer-file PATH")


def test_an_interrupted_prepare_leaves_no_shard_file(tmp_path, monkeypatch, capsys):
    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards.os, "fsync", interrupted)
    out = tmp_path / "o"
    assert main(["prepare", SHAKESPEARE, "--tokenizer", "char", "--out", str(out),
                 "--no-progress", "--workers", "1"]) == 130
    assert list(out.iterdir()) == []
    assert "holds no half-written shard" in capsys.readouterr().err
