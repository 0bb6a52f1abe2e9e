"""Triton kernels (``@triton.jit`` functions and their launch-config lists only).

Installed as ``fastgpt.kernels``. No autograd, no torch.library, no driver queries at import.
"""
