"""Build and install fastgpt.

The top-level ``kernels/`` folder (Triton kernels) installs as ``fastgpt.kernels``: a top-level
``kernels`` import name would clash with an existing PyPI package.
"""

from setuptools import setup

setup(
    name="fastgpt",
    version="0.1.0",
    description="Character-level GPT training with fused Triton kernels and a C++/CUDA extension",
    python_requires=">=3.10",
    packages=["fastgpt", "fastgpt.ops", "fastgpt.kernels"],
    package_dir={"fastgpt": "fastgpt", "fastgpt.kernels": "kernels"},
    package_data={"fastgpt": ["data/tinyshakespeare.txt"]},
    install_requires=["torch>=2.5", "numpy", "tqdm", "matplotlib"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["fastgpt = fastgpt.cli:main"]},
)
