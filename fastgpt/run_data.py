"""What a training run reads: a UTF-8 text file (characters, the lecture's workload) or token
shards (``fastgpt prepare``'s, llm.c's), and the tokenizer that goes with it.

``open_source(--data)`` gives the tokenizer's spec (checkpoints store it, so ``fastgpt sample``
decodes with the same tokenizer), the vocabulary size, the model's vocabulary size (GPT-2's
50,257 padded to 50,304, a multiple of 64, as nanoGPT does: the padding rows are never targets
and never sampled) and, given the block size, the dataset. The tokenizer itself is loaded for
sampling only: training on GPT-2 shards needs no vocabulary file, so where tiktoken has none
(offline) the run trains and says why it draws no sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from fastgpt.data import TextDataset, read_text
from fastgpt.errors import FastGPTError
from fastgpt.shard_dataset import ShardDataset, data_spec, is_shard_data
from fastgpt.shards import find_shards
from fastgpt.tokenizers import GPT2_VOCAB_SIZE, CharLevelTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger("fastgpt")
PAD_VOCAB_TO = 64


@dataclass
class DataSource:
    data: Optional[str]                 # --data as given (None: the bundled text)
    spec: dict                          # the tokenizer's, self-contained
    vocab_size: int                     # the tokenizer's
    tokenizer: Optional[Tokenizer]      # None where it cannot be loaded (see the module doc)
    text: Optional[str] = None          # the text of a text source

    @property
    def label(self) -> str:
        return f"data {self.data!r}" if self.data else "the bundled text"

    @property
    def model_vocab_size(self) -> int:
        if self.spec.get("kind") != "gpt2":
            return self.vocab_size
        return -(-self.vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO

    def dataset(self, block_size: int):
        if self.text is not None:
            return TextDataset(self.text, self.tokenizer, block_size, source=self.label)
        return ShardDataset(self.data, block_size)


def open_source(data: Optional[str]) -> DataSource:
    """The source ``--data`` names: token shards (a directory, or a pattern ending in .bin),
    else a text file (the bundled tiny Shakespeare when None)."""
    if not is_shard_data(data):
        text = read_text(data)
        tokenizer = CharLevelTokenizer.from_text(text)
        return DataSource(data, tokenizer.spec, tokenizer.vocab_size, tokenizer, text)
    spec = data_spec(data, find_shards(data))
    try:
        tokenizer = load_tokenizer(spec)
    except FastGPTError as e:
        if spec.get("kind") != "gpt2" or "ranks" in spec:
            raise
        log.warning(f"fastgpt: training on {data!r} without GPT-2's vocabulary files, so no "
                    f"text can be sampled at the end: {e}")
        return DataSource(data, spec, GPT2_VOCAB_SIZE, None)
    return DataSource(data, spec, tokenizer.vocab_size, tokenizer)


def spec_of_checkpoint(state: dict) -> dict:
    """The tokenizer spec a checkpoint holds (checkpoints before token shards hold the
    character vocabulary alone)."""
    return state.get("tokenizer") or {"kind": "char", "chars": state["vocab"]}
