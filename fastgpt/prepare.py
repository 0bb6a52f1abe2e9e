"""`fastgpt prepare`: text or JSON-lines documents -> token shards in llm.c's format + meta.json.

Inputs, in the order given: text files (one document each), folders (every ``*.txt`` below
them, sorted by path, one document each), and JSON-lines files (``.jsonl``: one document per
line, its ``"text"`` field; blank lines skipped). Empty documents are skipped.

Separators: as llm.c and modded-nanogpt do, the end-of-text token goes before every document
(GPT-2's ``<|endoftext|>``, bpe:N's own). The char tokenizer has none: "\\n\\n" goes between
documents, so a single document (tiny Shakespeare) tokenizes exactly as CharTokenizer does.

Split: validation is the first ``val_chars`` characters of the document stream (separators not
counted), ``val_chars = max(round(val_fraction * characters), min(8192, characters // 2))``: a
few thousand characters at least (about two GPT-2 windows of 1024 tokens), the same every run
and for any number of workers. A document straddling that point is cut there (a BPE may
tokenize the two sides of the cut unlike the whole, as nanoGPT's 90/10 cut does).

Output: ``<prefix>_val_000000.bin`` (and more val shards if it is that large), then
``<prefix>_train_NNNNNN.bin``, one counter for both (llm.c's FineWeb layout), each of up to
``--shard-tokens`` tokens; prefix = the output folder's name with "_" written "-" (so the split
in a name stays unambiguous); then ``meta.json`` (tokenizer spec, token counts, shards, inputs).

Memory stays bounded: documents are read in pieces of about a million characters, cut before a
"\\n" or " " that follows a non-space, a place where GPT-2's pre-tokenizer regex starts a new
piece anyway, so the pieces encode exactly as the whole document would; only a JSON line is
held whole. The input is read twice: a first pass checks all of it before anything is written
(and collects char's alphabet), bpe:N reads it once more to train, the last pass tokenizes:
pieces go to K worker processes (Pool.imap, order kept, 2 per worker in flight at most) and
the tokens into a shard buffer written when full, under a temporary name, so an interrupted
run leaves no half-written shard.
"""

from __future__ import annotations

import codecs
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from tqdm import tqdm

import fastgpt
from fastgpt.checkpoint import write_atomically
from fastgpt.errors import FastGPTError
from fastgpt.shards import META_NAME, TOKEN_DTYPES, shard_version, write_shard
from fastgpt.tokenizers import (CharLevelTokenizer, Tokenizer, gpt2_from_file, gpt2_from_tiktoken,
                                parse_tokenizer_choice, train_bpe)

META_FORMAT = "fastgpt-shards-1"
PIECE_CHARS = 1 << 20          # characters per piece of a document (and bytes per read)
PIECES_PER_BATCH = 1           # a batch sent to a worker: about one piece's characters
MIN_VAL_CHARS = 8192
MAX_SHARD_TOKENS = (1 << 31) - 1   # the header's count is an int32
CHAR_SEPARATOR = "\n\n"
_COUNT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgG]?)")
_LATER_CUT = re.compile(r"(?<=\S)[\n ]")


@dataclass
class PrepareOptions:
    inputs: list[str]
    tokenizer: str                       # char, gpt2 or bpe:N
    out_dir: str
    val_fraction: float = 0.0005
    shard_tokens: int = 10 ** 8
    workers: int = 1
    tokenizer_file: Optional[str] = None
    overwrite: bool = False
    progress: bool = True
    piece_chars: int = PIECE_CHARS       # smaller in tests, to cut documents into many pieces


@dataclass
class PrepareResult:
    out_dir: Path
    tokenizer: Tokenizer
    documents: int
    tokens: dict[str, int]
    shards: dict[str, list[str]]
    seconds: float


@dataclass(frozen=True)
class Source:
    path: Path
    jsonl: bool


@dataclass
class Survey:
    """What the checking pass saw."""
    documents: int = 0
    characters: int = 0
    alphabet: set[str] = field(default_factory=set)


class Batch(NamedTuple):
    split: str                 # "val" or "train"
    texts: list[str]           # pieces of documents
    separated: list[bool]      # whether the document separator goes before each piece
    documents: int             # documents started in this batch


def parse_token_count(text: str | int) -> int:
    """``100M`` -> 100000000 (K, M, G are powers of 1000, as llm.c's shard_size = 10**8)."""
    m = _COUNT.fullmatch(str(text).strip())
    value = float(m.group(1)) * 1000 ** " kmg".index(m.group(2).lower() or " ") if m else 0
    if not m or value != int(value) or not 1 <= value <= MAX_SHARD_TOKENS:
        raise FastGPTError(f"--shard-tokens {text!r}: give a whole number of tokens from 1 to "
                           f"{MAX_SHARD_TOKENS:,} (the header's int32 count), e.g. 100M or 5000")
    return int(value)


def shard_prefix(out_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9.-]", "-", out_dir.resolve().name).strip("-.")
    return name or "data"


def prepare(opts: PrepareOptions) -> PrepareResult:
    """Tokenize ``opts.inputs`` into shards in ``opts.out_dir``; every check comes first."""
    start = time.perf_counter()
    kind, n_vocab = _check_options(opts)
    out, old = _check_out_dir(Path(opts.out_dir), opts.overwrite)
    sources = find_sources(opts.inputs)
    tokenizer = _load_gpt2(opts) if kind == "gpt2" else None
    survey = survey_inputs(sources, opts.piece_chars, alphabet=kind == "char")
    if survey.characters < 2:
        raise FastGPTError(f"the inputs hold {survey.characters} character(s) of text: too "
                           f"little for a train and a val split")
    if kind == "char":
        alphabet = survey.alphabet | (set(CHAR_SEPARATOR) if survey.documents > 1 else set())
        tokenizer = CharLevelTokenizer("".join(sorted(alphabet)))
    elif kind == "bpe":
        pieces = (text for text, _ in read_documents(sources, opts.piece_chars))
        tokenizer = train_bpe(n_vocab, pieces)
    shard_version(tokenizer.vocab_size)   # fits the format (bpe:N was checked before training)
    # nothing has been written so far
    out.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.unlink()
    writer = ShardWriter(out, shard_prefix(out), tokenizer.vocab_size, opts.shard_tokens)
    batches = _batches(read_documents(sources, opts.piece_chars), val_chars(opts, survey),
                       separate_first=tokenizer.eot_id is not None,
                       batch_chars=PIECES_PER_BATCH * opts.piece_chars)
    separator = ([tokenizer.eot_id] if tokenizer.eot_id is not None
                 else tokenizer.encode(CHAR_SEPARATOR))
    encoder = Encoder(tokenizer, separator, writer.dtype)
    with tqdm(total=survey.documents, unit="doc", disable=not opts.progress,
              file=sys.stderr, desc="tokenizing") as bar:
        for split, tokens, documents in encode_in_order(batches, encoder, opts.workers):
            writer.add(split, tokens)
            bar.update(documents)
            rate = sum(writer.tokens.values()) / max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
    writer.flush()
    result = PrepareResult(out, tokenizer, survey.documents, writer.tokens, writer.shards,
                           time.perf_counter() - start)
    _write_meta(result, opts, sources, survey)
    return result


def _check_options(opts: PrepareOptions) -> tuple[str, Optional[int]]:
    kind, n_vocab = parse_tokenizer_choice(opts.tokenizer)
    if n_vocab is not None:
        shard_version(n_vocab)
    if opts.tokenizer_file is not None and kind != "gpt2":
        raise FastGPTError(f"--tokenizer-file is a GPT-2 BPE file for --tokenizer gpt2; "
                           f"--tokenizer {opts.tokenizer} does not take one")
    if not 0 < opts.val_fraction < 1:
        raise FastGPTError(f"--val-fraction {opts.val_fraction}: give a fraction between 0 and "
                           f"1 (exclusive), e.g. 0.0005")
    if opts.workers < 1:
        raise FastGPTError(f"--workers {opts.workers}: give 1 or more worker processes")
    parse_token_count(opts.shard_tokens)
    return kind, n_vocab


def _check_out_dir(out: Path, overwrite: bool) -> tuple[Path, list[Path]]:
    """The output folder, and the shards and meta.json in it that --overwrite replaces."""
    if out.exists() and not out.is_dir():
        raise FastGPTError(f"--out {str(out)!r} is a file, not a folder")
    old = []
    if out.is_dir():
        old = sorted({*out.glob("*_train_*.bin"), *out.glob("*_val_*.bin")})
        old += [out / META_NAME] if (out / META_NAME).exists() else []
    if old and not overwrite:
        raise FastGPTError(f"--out {str(out)!r} already holds {len(old)} shard file(s) or "
                           f"meta.json (e.g. {old[0].name}); pass --overwrite to replace them, "
                           f"or choose another folder")
    return out, old


def _load_gpt2(opts: PrepareOptions) -> Tokenizer:
    if opts.tokenizer_file is not None:
        return gpt2_from_file(opts.tokenizer_file)
    return gpt2_from_tiktoken()


def val_chars(opts: PrepareOptions, survey: Survey) -> int:
    """How many characters, from the start of the stream, the validation split takes."""
    total = survey.characters
    wanted = max(round(opts.val_fraction * total), min(MIN_VAL_CHARS, total // 2))
    return min(max(wanted, 1), total - 1)


def find_sources(inputs: Iterable[str]) -> list[Source]:
    """Each input as files: a folder becomes its ``*.txt`` files, sorted, found recursively."""
    sources = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise FastGPTError(f"input folder {text!r} holds no .txt files")
            sources += [Source(p, jsonl=False) for p in files]
        elif path.is_file():
            sources.append(Source(path, jsonl=path.suffix == ".jsonl"))
        else:
            raise FastGPTError(f"input {text!r} does not exist")
    if not sources:
        raise FastGPTError("give at least one input: a text file, a folder of .txt files, or a "
                           ".jsonl file")
    return sources


def survey_inputs(sources: list[Source], piece_chars: int, alphabet: bool = False) -> Survey:
    """Read every input once: each error it holds raises here, before anything is written.
    ``alphabet``: collect the set of characters too (the char tokenizer's vocabulary)."""
    survey = Survey()
    for text, starts in read_documents(sources, piece_chars):
        survey.documents += starts
        survey.characters += len(text)
        if alphabet:
            survey.alphabet.update(text)
    return survey


def read_documents(sources: list[Source], piece_chars: int) -> Iterator[tuple[str, bool]]:
    """(piece of text, whether it starts a document) for every document of ``sources``."""
    for source in sources:
        if source.jsonl:
            for text in _jsonl_texts(source.path):
                yield from _first_marked(cut_pieces([text], piece_chars))
        else:
            blocks = _utf8_blocks(source.path, piece_chars)
            yield from _first_marked(cut_pieces(blocks, piece_chars))


def _first_marked(pieces: Iterable[str]) -> Iterator[tuple[str, bool]]:
    for i, piece in enumerate(pieces):
        yield piece, i == 0


def _utf8_blocks(path: Path, block_bytes: int) -> Iterator[str]:
    """The text of ``path``, decoded as UTF-8 block by block; a bad byte names its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            pending = len(decoder.getstate()[0])   # bytes of a character cut by the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise FastGPTError(f"input {str(path)!r} is not UTF-8 text: byte "
                                   f"0x{e.object[e.start]:02x} at offset {offset - pending + e.start} "
                                   f"cannot be decoded") from None
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def _jsonl_texts(path: Path) -> Iterator[str]:
    """The ``"text"`` of each JSON line of ``path``; a bad line names its number."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"input {str(path)!r} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FastGPTError(f"{where} is not UTF-8 text: byte 0x{raw[e.start]:02x} at "
                                   f"offset {offset + e.start} cannot be decoded") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FastGPTError(f"{where} is not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise FastGPTError(f"{where} has no \"text\" field: each line of a .jsonl input "
                                   f"is an object like {{\"text\": \"...\"}}")
            if not isinstance(record["text"], str):
                raise FastGPTError(f"{where}: its \"text\" is a {type(record['text']).__name__},"
                                   f" not a string")
            yield record["text"]


def cut_pieces(chunks: Iterable[str], piece_chars: int) -> Iterator[str]:
    """One document's text, arriving in ``chunks``, as pieces of about ``piece_chars``
    characters, each cut where GPT-2's pre-tokenizer starts a new piece anyway (see _cut)."""
    carry = ""
    for chunk in chunks:
        carry += chunk
        start = 0
        while len(carry) - start > piece_chars:
            cut = _cut(carry, start, piece_chars)
            if not cut:
                break
            yield carry[start:cut]
            start = cut
        carry = carry[start:]
    if carry:
        yield carry


def _cut(text: str, start: int, piece_chars: int) -> int:
    """Where the piece starting at ``start`` ends: before a "\\n" or " " that follows a
    non-space, the last such place within ``piece_chars`` or else the first after; 0: none yet.

    GPT-2's regex (tiktoken's and the ByteLevel pre-tokenizer's) never lets a piece run from a
    non-space into whitespace, and starts matching afresh there, so both sides encode as in
    the whole. Python's isspace() covers the regex's \\s, so "not isspace" is safe. A text
    with no such place for 8 pieces' length is cut anyway (a rare, harmless seam)."""
    end = min(start + piece_chars, len(text) - 1) + 1
    while True:
        i = max(text.rfind("\n", start + 1, end), text.rfind(" ", start + 1, end))
        if i < 0:
            break
        if not text[i - 1].isspace():
            return i
        end = i
    later = _LATER_CUT.search(text, start + piece_chars)
    if later:
        return later.start()
    return start + piece_chars if len(text) - start >= 8 * piece_chars else 0


def _batches(pieces: Iterable[tuple[str, bool]], val_chars: int, separate_first: bool,
             batch_chars: int) -> Iterator[Batch]:
    """Pieces labelled val (the first ``val_chars`` characters) or train, in batches of about
    ``batch_chars`` characters, one split each. ``separate_first``: the separator goes before the
    first document too (the end-of-text token does; char's "\\n\\n" goes between documents)."""
    seen, documents_seen = 0, 0
    split, texts, separated, documents, size = "val", [], [], 0, 0
    for text, starts in pieces:
        separate = starts and (separate_first or documents_seen > 0)
        documents_seen += starts
        parts = [text]
        if seen < val_chars < seen + len(text):      # the document is cut at the split
            parts = [text[:val_chars - seen], text[val_chars - seen:]]
        for j, part in enumerate(parts):
            part_split = "val" if seen < val_chars else "train"
            if texts and (part_split != split or size >= batch_chars):
                yield Batch(split, texts, separated, documents)
                texts, separated, documents, size = [], [], 0, 0
            split = part_split
            texts.append(part)
            separated.append(separate and j == 0)
            documents += starts and j == 0
            size += len(part)
            seen += len(part)
    if texts:
        yield Batch(split, texts, separated, documents)


class Encoder:
    """Tokens of a batch as one array: the separator before each document, then its text."""

    def __init__(self, tokenizer: Tokenizer, separator: list[int], dtype: np.dtype):
        self.tokenizer = tokenizer
        self.separator = np.asarray(separator, dtype=dtype)
        self.dtype = dtype

    def __call__(self, batch: Batch) -> tuple[str, np.ndarray, int]:
        parts = []
        for separated, ids in zip(batch.separated, self.tokenizer.encode_batch(batch.texts)):
            if separated:
                parts.append(self.separator)
            parts.append(np.asarray(ids, dtype=self.dtype))
        return batch.split, np.concatenate(parts), batch.documents


_worker_encoder: Optional[Encoder] = None   # set in each worker process by _start_worker


def _start_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C stops the parent, which ends us
    # this worker's own environment: one thread each (the K processes are the parallelism)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_in_worker(batch: Batch) -> tuple[str, np.ndarray, int]:
    return _worker_encoder(batch)


def encode_in_order(batches: Iterable[Batch], encoder: Encoder,
                    workers: int) -> Iterator[tuple[str, np.ndarray, int]]:
    """``encoder`` over ``batches`` in ``workers`` processes, results in input order, at most
    2 batches per worker read ahead (Pool.imap alone would read the whole input at once)."""
    if workers == 1:
        yield from map(encoder, batches)
        return
    slots = threading.BoundedSemaphore(2 * workers)

    def read_ahead_bounded() -> Iterator[Batch]:
        for batch in batches:
            slots.acquire()
            yield batch

    with multiprocessing.Pool(workers, initializer=_start_worker, initargs=(encoder,)) as pool:
        for result in pool.imap(_encode_in_worker, read_ahead_bounded()):
            slots.release()
            yield result


class ShardWriter:
    """Collects tokens into a shard buffer and writes each shard when full (or at a split's
    end): ``<prefix>_<split>_NNNNNN.bin``, one counter for both splits."""

    def __init__(self, out: Path, prefix: str, vocab_size: int, shard_tokens: int):
        self.out, self.prefix, self.vocab_size = out, prefix, vocab_size
        self.dtype = TOKEN_DTYPES[shard_version(vocab_size)]
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)   # pages are touched as it fills
        self.fill = 0
        self.split = "val"
        self.tokens = {"train": 0, "val": 0}
        self.shards: dict[str, list[str]] = {"train": [], "val": []}

    def add(self, split: str, tokens: np.ndarray) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        self.tokens[split] += len(tokens)
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        index = len(self.shards["train"]) + len(self.shards["val"])
        name = f"{self.prefix}_{self.split}_{index:06d}.bin"
        write_shard(self.out / name, self.buffer[:self.fill], self.vocab_size)
        self.shards[self.split].append(name)
        self.fill = 0


def _write_meta(result: PrepareResult, opts: PrepareOptions, sources: list[Source],
                survey: Survey) -> None:
    tokenizer = result.tokenizer
    meta = {
        "format": META_FORMAT,
        "fastgpt_version": fastgpt.__version__,
        "tokenizer": tokenizer.spec,
        "tokenizer_name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "document_separator": ("end-of-text token before each document"
                               if tokenizer.eot_id is not None
                               else f"{CHAR_SEPARATOR!r} between documents"),
        "shard_version": shard_version(tokenizer.vocab_size),
        "tokens": result.tokens,
        "documents": result.documents,
        "characters": survey.characters,
        "val_fraction": opts.val_fraction,
        "val_characters": val_chars(opts, survey),
        "shards": result.shards,
        "inputs": [str(s.path) for s in sources],
    }
    text = json.dumps(meta, indent=1, ensure_ascii=False) + "\n"
    write_atomically(result.out_dir / META_NAME, lambda f: f.write(text.encode("utf-8")))
