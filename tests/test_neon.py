"""The AArch64 NEON LUT engine, run under qemu-user: cross-compiled with the ATen-free engine sources
(csrc/lut/) and a stand-alone driver (csrc/lut/tools/engine_check.cpp) that checks tables, tiles and
dequantization against the scalar engine bit for bit. CI is x86, so this is where the NEON code runs.

Needs Debian's ``g++-aarch64-linux-gnu`` and ``qemu-user`` (``bash scripts/check_neon.sh`` installs them);
skipped, with that reason, where they are absent.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX, QEMU = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
SOURCES = ["csrc/lut/tools/engine_check.cpp"] + [f"csrc/lut/{n}.cpp" for n in
                                                  ("scalar", "dispatch", "avx2", "avx512", "neon")]


@pytest.mark.skipif(CXX is None or QEMU is None, reason="no AArch64 cross toolchain / qemu-user here "
                    "(apt-get install g++-aarch64-linux-gnu qemu-user, or run scripts/check_neon.sh)")
def test_neon_engine_bit_exact_under_qemu(tmp_path):
    exe = tmp_path / "engine_check"
    subprocess.run([CXX, "-O2", "-std=c++17", "-static", *SOURCES, "-o", str(exe)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    r = subprocess.run([QEMU, str(exe), "neon"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("engine_check: 9 cases OK (neon vs scalar)"), r.stdout
    # The bit-serial cases (INT2/INT4) must really run the NEON kernels, not fall back to scalar.
    assert sum("engine=neon" in ln for ln in lines) == 4, r.stdout


def test_engine_sources_build_without_torch():
    """The engines include nothing from ATen/torch (what lets the cross build above work at all)."""
    for src in SOURCES + ["csrc/lut/engine.h", "csrc/lut/engine_inl.h"]:
        text = (ROOT / src).read_text()
        assert "#include <ATen" not in text and "#include <torch" not in text and "c10/" not in text, src
