"""fastgpt: a character-level GPT whose hot ops (attention, cross-entropy, embedding) run on
fused kernels, with the naive versions kept beside them as references."""

__version__ = "0.1.0"
