"""Tokenizers for token shards: character-level, GPT-2's BPE (tiktoken), and a byte-level BPE
trained on the corpus (Hugging Face ``tokenizers``), each rebuilt from a small JSON ``spec``.

A tokenizer has ``spec``, ``name``, ``vocab_size``, ``eot_id``, ``encode``, ``encode_batch`` and
``decode``. Its spec is self-contained (checkpoints and meta.json store it; nothing else is
needed to rebuild it), with one exception, GPT-2's own vocabulary, which tiktoken supplies:

- ``{"kind": "char", "chars": "..."}``: fastgpt.data.CharTokenizer, one token per character.
  It has no end-of-text token (``eot_id`` None): ``fastgpt prepare`` separates documents by
  "\\n\\n" instead.
- ``{"kind": "gpt2"}``: GPT-2's 50,257 tokens, ``<|endoftext|>`` = 50256, from tiktoken's cached
  files (``TIKTOKEN_CACHE_DIR``) or its download, or from a local copy: ``tokenizer_file`` (the
  CLI's ``--tokenizer-file``) is a folder holding GPT-2's ``vocab.bpe`` and ``encoder.json``, or a
  ``.tiktoken`` rank file. Built from a local copy, the spec also records its path (``"file"``)
  as a hint, verified by sha256 when used. A local GPT-2-format file holding another
  vocabulary (a custom one, a test's) is inlined instead: ``{"kind": "gpt2", "ranks": "<the
  .tiktoken text>"}``, GPT-2's regex, ``<|endoftext|>`` = the id after the last rank.
- ``{"kind": "bpe", "vocab_size": N, "json": "<tokenizers JSON>"}``: ``bpe:N``, a byte-level
  BPE (GPT-2's regex and byte alphabet) trained by ``train_bpe``; ``<|endoftext|>`` = 0.

Text is encoded as ordinary text everywhere: "<|endoftext|>" written inside a document becomes
its characters' tokens, never the end-of-text token (llm.c's ``encode_ordinary``).

Layering: this module builds on fastgpt.data (CharTokenizer), so fastgpt.data must not import
it (an import cycle); train, sample and checkpoint may.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Protocol

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str as GPT2_PATTERN
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastgpt import data
from fastgpt.errors import FastGPTError

GPT2_VOCAB_SIZE = 50257
# sha256 of the files tiktoken loads GPT-2's vocabulary from (tiktoken_ext/openai_public.py);
# r50k_base holds the same ranks as gpt2, in .tiktoken form
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ".tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}
BYTE_TOKENS = 256
BPE_MIN_VOCAB = BYTE_TOKENS + 1     # every byte, and the end-of-text token
KINDS = ("char", "gpt2", "bpe:N")


class Tokenizer(Protocol):
    spec: dict
    name: str
    vocab_size: int
    eot_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


def parse_tokenizer_choice(choice: str) -> tuple[str, Optional[int]]:
    """``char`` -> ("char", None), ``gpt2`` -> ("gpt2", None), ``bpe:N`` -> ("bpe", N)."""
    if choice in ("char", "gpt2"):
        return choice, None
    m = re.fullmatch(r"bpe:(\d+)", choice)
    if not m:
        raise FastGPTError(f"unknown tokenizer {choice!r}; choose one of: char, gpt2, bpe:N "
                           f"(a byte-level BPE of N tokens, e.g. bpe:4096)")
    n = int(m.group(1))
    if n < BPE_MIN_VOCAB:
        raise FastGPTError(f"{choice}: a byte-level BPE needs at least {BPE_MIN_VOCAB} tokens "
                           f"({BYTE_TOKENS} bytes and the end-of-text token); got {n}")
    return "bpe", n


def infer_spec(vocab_size: int) -> Optional[dict]:
    """The tokenizer of shards without a meta.json (llm.c's, modded-nanogpt's FineWeb), from
    the smallest vocabulary holding their tokens (max token id + 1): GPT-2's when it fits."""
    return {"kind": "gpt2"} if 0 < vocab_size <= GPT2_VOCAB_SIZE else None


def load_tokenizer(spec: dict, tokenizer_file: Optional[str | Path] = None) -> Tokenizer:
    """Rebuild the tokenizer a spec describes. ``tokenizer_file`` is a local copy of GPT-2's
    vocabulary for ``{"kind": "gpt2"}`` where tiktoken has none cached (ignored otherwise)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "char":
        return CharLevelTokenizer(spec["chars"])
    if kind == "gpt2":
        if "ranks" in spec:
            return GPT2Tokenizer.from_ranks(_parse_ranks(spec["ranks"], "the tokenizer spec"))
        local = tokenizer_file if tokenizer_file is not None else spec.get("file")
        if local is None or (tokenizer_file is None and not Path(local).exists()):
            return gpt2_from_tiktoken(recorded=local)
        tokenizer = gpt2_from_file(local)
        if "ranks" in tokenizer.spec:
            raise FastGPTError(f"tokenizer file {str(local)!r} does not hold GPT-2's vocabulary "
                               f"(its sha256 differs from GPT-2's files), which this tokenizer "
                               f"spec names")
        return tokenizer
    if kind == "bpe":
        return ByteBPETokenizer(HFTokenizer.from_str(spec["json"]))
    raise FastGPTError(f"unknown tokenizer spec {spec!r}: its 'kind' must be char, gpt2 or bpe")


class CharLevelTokenizer(data.CharTokenizer):
    """fastgpt.data.CharTokenizer with a spec: the same vocabulary and ids."""

    name = "char"
    eot_id = None

    @property
    def spec(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode_tensor(t).tolist() for t in texts]


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken (or another vocabulary in its format)."""

    def __init__(self, encoding: tiktoken.Encoding, spec: dict):
        self.encoding = encoding
        self.spec = spec
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token
        self.name = "gpt2" if "ranks" not in spec else f"gpt2-format:{self.vocab_size}"

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], file: Optional[Path] = None,
                   standard: bool = False) -> "GPT2Tokenizer":
        """GPT-2's regex and ``<|endoftext|>`` over ``ranks``; ``standard``: they are GPT-2's."""
        eot = max(ranks.values()) + 1
        encoding = tiktoken.Encoding(name="gpt2" if standard else f"gpt2-format-{eot + 1}",
                                     pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={ENDOFTEXT: eot})
        if standard:
            spec = {"kind": "gpt2", "file": str(file.resolve())}
        else:
            spec = {"kind": "gpt2", "ranks": _format_ranks(ranks)}
        return cls(encoding, spec)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one thread: fastgpt prepare parallelises with processes
        return self.encoding.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))


class ByteBPETokenizer:
    """A byte-level BPE trained with Hugging Face ``tokenizers`` (``bpe:N``)."""

    def __init__(self, hf: HFTokenizer):
        hf.encode_special_tokens = True   # "<|endoftext|>" in a text is text (encode_ordinary)
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()
        self.eot_id = hf.token_to_id(ENDOFTEXT)
        self.name = f"bpe:{self.vocab_size}"
        self.spec = {"kind": "bpe", "vocab_size": self.vocab_size, "json": hf.to_str()}

    def __reduce__(self):
        # through __init__: a pickled tokenizers.Tokenizer forgets encode_special_tokens (worker
        # processes started by spawn or forkserver get the tokenizer pickled)
        return ByteBPETokenizer, (self.hf,)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def train_bpe(vocab_size: int, texts: Iterable[str], length: Optional[int] = None,
              ) -> ByteBPETokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (fewer if the texts run out of
    pairs to merge) on an iterator of texts, streamed. ``length``: how many, for its progress."""
    if vocab_size < BPE_MIN_VOCAB:
        raise FastGPTError(f"a byte-level BPE needs at least {BPE_MIN_VOCAB} tokens, got "
                           f"{vocab_size}")
    hf = HFTokenizer(models.BPE())
    # no prefix space: a text cut into pieces at "\n" encodes as the whole text does
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer, length=length)
    return ByteBPETokenizer(hf)


def gpt2_from_tiktoken(recorded: Optional[str] = None) -> GPT2Tokenizer:
    """GPT-2 from tiktoken's cache, or its download; offline without them, a one-line error."""
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:   # requests' ConnectionError, a hash mismatch, an unwritable cache
        missing = (f"the file {recorded!r} it was built from is gone, and " if recorded else "")
        raise FastGPTError(
            f"the gpt2 tokenizer needs GPT-2's vocabulary: {missing}tiktoken has no cached copy "
            f"and could not download one ({type(e).__name__}); set TIKTOKEN_CACHE_DIR "
            f"to a folder holding tiktoken's cached files, or pass --tokenizer-file PATH (a "
            f"folder with GPT-2's vocab.bpe and encoder.json, or a .tiktoken rank file)") from None
    return GPT2Tokenizer(encoding, {"kind": "gpt2"})


def gpt2_from_file(path: str | Path) -> GPT2Tokenizer:
    """A GPT-2-format BPE from a folder holding ``vocab.bpe`` + ``encoder.json`` (one of those
    files names its folder too) or a ``.tiktoken`` rank file (base64 token, space, rank)."""
    path = Path(path)
    if path.name in ("vocab.bpe", "encoder.json"):
        path = path.parent
    if not path.exists():
        raise FastGPTError(f"tokenizer file {str(path)!r} does not exist")
    if path.is_dir():
        files = {name: path / name for name in ("vocab.bpe", "encoder.json")}
        missing = [n for n, p in files.items() if not p.is_file()]
        if missing:
            raise FastGPTError(f"tokenizer folder {str(path)!r} lacks {' and '.join(missing)}: "
                               f"a GPT-2 BPE folder holds vocab.bpe and encoder.json")
        hashes = {name: _sha256(p) for name, p in files.items()}
        try:   # the hashes make tiktoken's path-keyed cache give back these very files
            ranks = data_gym_to_mergeable_bpe_ranks(
                str(files["vocab.bpe"]), str(files["encoder.json"]),
                vocab_bpe_hash=hashes["vocab.bpe"], encoder_json_hash=hashes["encoder.json"])
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            raise FastGPTError(f"tokenizer folder {str(path)!r}: vocab.bpe and encoder.json are "
                               f"not a matching GPT-2 BPE pair ({type(e).__name__})") from None
        standard = all(hashes[n] == GPT2_FILE_SHA256[n] for n in files)
    else:
        ranks = _parse_ranks(_read_utf8(path), repr(str(path)))
        standard = _sha256(path) == GPT2_FILE_SHA256[".tiktoken"]
    return GPT2Tokenizer.from_ranks(ranks, file=path, standard=standard)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FastGPTError(f"tokenizer file {str(path)!r} is not a .tiktoken rank file: byte "
                           f"offset {e.start} is not UTF-8") from None


def _parse_ranks(text: str, source: str) -> dict[bytes, int]:
    """tiktoken's rank format, one ``<base64 token> <rank>`` a line, into {token: rank}."""
    ranks = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise FastGPTError(f"{source} line {number} is not '<base64 token> <rank>': "
                               f"{line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))) \
            or any(bytes([b]) not in ranks for b in range(BYTE_TOKENS)):
        raise FastGPTError(f"{source} is not a BPE rank file: it needs ranks 0..n-1, one per "
                           f"token, the {BYTE_TOKENS} single bytes among them")
    return ranks


def _format_ranks(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
