from setuptools import find_packages, setup

setup(
    name="peer_kernels",
    version="0.1.0",
    description="Fused Triton kernels for the PEER layer (Mixture of A Million Experts)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # csrc_reference/ lives at the top of the repo but is JIT-built on first use, so it is installed
    # as the data-only subpackage peer_kernels.csrc_reference (pip install stays pure Python).
    packages=find_packages(include=["peer_kernels", "peer_kernels.*"]) + ["peer_kernels.csrc_reference"],
    package_dir={"peer_kernels.csrc_reference": "csrc_reference"},
    package_data={"peer_kernels.csrc_reference": ["*.cpp", "*.cu", "*.h"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
        "tabulate",
        "ninja",
    ],
    extras_require={
        # peer-pytorch 0.2.2 added train_mem_mask (tests/test_compat.py); peft 0.14 exclude_modules
        "test": ["pytest", "hypothesis", "peer-pytorch>=0.2.2", "einx", "transformers>=4.40", "peft>=0.14"],
        "bench": ["peer-pytorch>=0.2", "einx", "matplotlib"],
        "transformers": ["transformers>=4.40"],
    },
)
