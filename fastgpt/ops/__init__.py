"""fastgpt's dispatch layer: the public op functions and the backend registry.

Every op has a plain-PyTorch reference backend; fast backends register themselves on import
below. See fastgpt/ops/registry.py for how a backend is chosen.
"""

from fastgpt.ops.registry import available_backends, backend_names, use_backends
from fastgpt.ops.attention import causal_attention
from fastgpt.ops.cross_entropy import cross_entropy
from fastgpt.ops.linear_cross_entropy import linear_cross_entropy
from fastgpt.ops.embedding import embedding
from fastgpt.ops.transformer_block import BlockWeights, transformer_block, transformer_block_decode

# --- fast backends: each module registers its backends and default order on import ---
# (one line per module; keep this block)
from fastgpt.ops import attention_triton  # noqa: F401  (triton, compile)
from fastgpt.ops import attention_ext  # noqa: F401  (ext)
from fastgpt.ops import embedding_ext  # noqa: F401  (ext)
from fastgpt.ops import cross_entropy_triton  # noqa: F401  (triton)
from fastgpt.ops import linear_cross_entropy_chunked  # noqa: F401  (chunked, compile, triton)
from fastgpt.ops import transformer_block_ext  # noqa: F401  (ext)
# --- end fast backends ---

__all__ = ["causal_attention", "cross_entropy", "linear_cross_entropy", "embedding",
           "transformer_block", "transformer_block_decode", "BlockWeights", "available_backends",
           "backend_names", "use_backends"]
