"""Build script: the Python package, its two sub-packages that live at the top level
(`kernels/` -> `dietcl_fast.kernels`, `cli/` -> `dietcl_fast.cli`) and the pybind11 extension
`dietcl_fast._core` compiled from the C++17 core in `csrc/`."""
import os
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CORE_SOURCES = sorted(glob("csrc/src/*.cpp"))

ext_modules = [
    Pybind11Extension(
        "dietcl_fast._core",
        ["csrc/bindings.cpp", *CORE_SOURCES],
        include_dirs=["csrc/include"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

here = os.path.dirname(os.path.abspath(__file__))
_readme = os.path.join(here, "README.md")
long_description = ""
if os.path.exists(_readme):
    with open(_readme, encoding="utf-8") as f:
        long_description = f.read()

# torch: the lent GPU machines run 2.11, this machine and CI 2.14.1 -> admit both.
install_requires = [
    "numpy>=1.24",
    "torch>=2.4",
    "torchvision>=0.19",
    "timm>=1.0.9",
    "click>=8.2",        # CliRunner keeps stderr apart (the tests read it)
    "pyyaml>=6",
    "tqdm>=4.66",
    "matplotlib>=3.7",
    "scikit-learn>=1.3",
    "pillow>=10",
    "safetensors>=0.4",
    "pyarrow>=14",          # csv:/parquet: indexes (dietcl_fast/streams/index.py)
]
extras = {
    "dali": ["nvidia-dali-cuda130"],
    "deepspeed": ["deepspeed>=0.15"],
    "tensorboard": ["tensorboard>=2.14"],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "pybind11>=2.12", "cmake>=3.18"],
}
extras["dev"] = sorted(set(extras["dali"] + extras["deepspeed"] + extras["tensorboard"]
                           + extras["test"]))

setup(
    name="dietcl-fast",
    version="0.1.0",
    description="Fast, budget-honest DietCL: semi-supervised continual learning under a compute budget",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=[
        "dietcl_fast",
        "dietcl_fast.streams",
        "dietcl_fast.pretrained",
        "dietcl_fast.data",
        "dietcl_fast.models",
        "dietcl_fast.engine",
        "dietcl_fast.methods",
        "dietcl_fast.bench",
        "dietcl_fast.afterrun",
        "dietcl_fast.kernels",
        "dietcl_fast.cli",
    ],
    package_dir={
        "dietcl_fast": "dietcl_fast",
        "dietcl_fast.kernels": "kernels",
        "dietcl_fast.cli": "cli",
    },
    package_data={"dietcl_fast": ["embedded/*.npz", "embedded/*LICENSE*", "embedded/README.md"],
                  "dietcl_fast.pretrained": ["*.pth"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["dietcl-fast=dietcl_fast.cli.main:entry"]},
    zip_safe=False,
)
