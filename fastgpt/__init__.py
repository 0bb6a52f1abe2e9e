"""fastgpt: a character-level GPT whose hot ops (attention, cross-entropy, embedding) run on
fused kernels, with the naive versions kept beside them as references."""

__version__ = "0.1.0"   # before the import below: fastgpt.ops.measured reads it while it runs

from fastgpt.pretrained import from_pretrained  # noqa: E402  (GPT-2 weights -> a fastgpt GPT)

__all__ = ["from_pretrained", "__version__"]
