"""Build and install fastgpt.

The top-level ``kernels/`` folder (Triton kernels) installs as ``fastgpt.kernels``: a top-level
``kernels`` import name would clash with an existing PyPI package.

The C++/CUDA extension ``fastgpt._C`` (csrc/) is built against the installed torch, so install
with ``pip install --no-build-isolation -e .`` (build isolation would fetch a different torch).
It is a CUDAExtension when that torch has CUDA and nvcc is found (TORCH_CUDA_ARCH_LIST defaults
to "8.0;9.0"), otherwise a CppExtension; ``FASTGPT_SKIP_EXT=1`` skips it, and fastgpt then
falls back to plain PyTorch for the embedding. ``FASTGPT_PTXAS_VERBOSE=1`` adds ``-Xptxas -v``.
"""

import os

from setuptools import setup

CSRC = "csrc"


def _extension():
    """(ext_modules, cmdclass) for fastgpt._C, or ([], {}) when it is skipped."""
    if os.environ.get("FASTGPT_SKIP_EXT", "0") == "1":
        print("fastgpt: FASTGPT_SKIP_EXT=1, not building fastgpt._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastgpt: torch is not importable at build time (use --no-build-isolation); "
              "not building fastgpt._C")
        return [], {}

    # at::parallel_for is an OpenMP pragma in ATen's headers: without -fopenmp it runs serially.
    # Linking libgomp resolves to the copy torch has already loaded (same soname).
    # -fno-math-errno: sqrt & co. need not set errno, so GCC can vectorise them (results unchanged)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    sources = [os.path.join(CSRC, f) for f in (
        "library.cpp", "adamw_cpu.cpp", "attention_autograd.cpp", "attention_cpu.cpp",
        "column_sums_cpu.cpp", "cpu_isa.cpp", "dropout_cpu.cpp", "embedding_autograd.cpp",
        "embedding_cpu.cpp", "embedding_cuda_emulated.cpp", "embedding_run_plan.cpp",
        "gelu_cpu.cpp", "layer_norm_cpu.cpp", "transformer_block_autograd.cpp",
        "transformer_block_cpu.cpp")]
    kwargs = dict(extra_link_args=["-fopenmp"])
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "-lineinfo"]
        if os.environ.get("FASTGPT_PTXAS_VERBOSE", "0") == "1":
            nvcc.append("-Xptxas=-v")
        sources.append(os.path.join(CSRC, "embedding_cuda.cu"))
        ext = cpp_extension.CUDAExtension("fastgpt._C", sources,
                                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = cpp_extension.CppExtension("fastgpt._C", sources,
                                         extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"fastgpt: building fastgpt._C as a {'CUDA' if with_cuda else 'C++'} extension")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension()

setup(
    name="fastgpt",
    version="0.1.0",
    description="Character-level GPT training with fused Triton kernels and a C++/CUDA extension",
    python_requires=">=3.10",
    packages=["fastgpt", "fastgpt.ops", "fastgpt.tools", "fastgpt.tools.bench", "fastgpt.kernels"],
    package_dir={"fastgpt": "fastgpt", "fastgpt.kernels": "kernels"},
    package_data={"fastgpt": ["data/tinyshakespeare.txt"]},
    # safetensors and huggingface_hub: GPT-2 weights in (--init-from) and out (fastgpt export);
    # transformers only checks them in the tests; tensorboard only for `train --tensorboard`
    install_requires=["torch>=2.5", "numpy", "tqdm", "matplotlib", "tiktoken", "tokenizers",
                      "safetensors", "huggingface_hub"],
    extras_require={"triton": ["triton"], "tensorboard": ["tensorboard"],
                    "test": ["pytest", "pytest-benchmark", "transformers", "tensorboard"]},
    entry_points={"console_scripts": ["fastgpt = fastgpt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
