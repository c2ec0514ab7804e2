"""Build glue: package layout (hub_configs/ installs as the package data hf_efficient/hub_configs) and the csrc/
extension (HF_EFFICIENT_NO_EXTENSION=1 skips it: a pure-Python build, used by the packaging test to build a wheel
in seconds)."""
import os
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent


def _packages():
    pkgs = find_packages(include=["hf_efficient", "hf_efficient.*"])
    return pkgs + ["hf_efficient.hub_configs"]  # data only: the recipes load_quant_config() reads


def _extension():
    # csrc/*.cpp (torch ops) and csrc/lut/*.cpp (the ATen-free LUT engines, one per ISA); csrc/lut/tools/
    # holds stand-alone drivers that are not part of the extension.
    sources = sorted(str(p.relative_to(ROOT)) for d in ("csrc", "csrc/lut") for p in (ROOT / d).glob("*.cpp"))
    # No global -mavx2/-mavx512f: SIMD code paths carry target attributes and are chosen at run time
    # (cpuid), so the same build runs on any CPU of its architecture (scalar fallback without AVX2).
    args = ["-O3", "-std=c++17", "-fopenmp"]
    return CppExtension("hf_efficient._C", sources, extra_compile_args={"cxx": args}, extra_link_args=["-fopenmp"])


setup(
    packages=_packages(),
    package_dir={"hf_efficient": "hf_efficient", "hf_efficient.hub_configs": "hub_configs"},
    ext_modules=[] if os.environ.get("HF_EFFICIENT_NO_EXTENSION") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
