"""What pyproject.toml cannot say: csrc_reference/ sits at the top of the repository but installs as
the data-only subpackage peer_kernels.csrc_reference (its C++/CUDA sources are JIT-built on first
use, so pip install stays pure Python), beside the packages found under peer_kernels/ (a package
discovery pyproject's own cannot combine with that renamed folder)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["peer_kernels", "peer_kernels.*"]) + ["peer_kernels.csrc_reference"],
    package_dir={"peer_kernels.csrc_reference": "csrc_reference"},
    package_data={"peer_kernels.csrc_reference": ["*.cpp", "*.cu", "*.h"]},
)
