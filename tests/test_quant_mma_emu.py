"""The CPU emulation of CUDA that runs the mma kernel's own code in these tests (``cuda/quant_mma_emu.h``).

``tests/test_quant_mma.py`` runs the kernel under it. Here, small probe kernels check the emulation itself: its
``mma.sync`` against a float matmul (the fragment layout of the PTX ISA, filled in independently below), and that
each kind of misuse it promises to catch is reported instead of computing a result.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hf_efficient.kernels import quant_mma as Q

PROBES = r"""
#include <torch/extension.h>
#include "quant_mma_emu.h"

// D (16x8) = A (16x16) B (16x8) through the emulated mma.sync; fragments as in the PTX ISA (m16n8k16, .row.col):
// lane = 4 g + t holds A[g][2t..2t+1] (a0), A[g+8][..] (a1), A[g][2t+8..] (a2), A[g+8][2t+8..] (a3),
// B[2t..2t+1][g] (b0), B[2t+8..2t+9][g] (b1) and D[g][2t..2t+1] (d0, d1), D[g+8][2t..2t+1] (d2, d3).
template <typename T, T (*CVT)(float)> torch::Tensor mma_t(torch::Tensor A, torch::Tensor B, torch::Tensor C) {
  auto D = torch::empty({16, 8}, torch::kFloat);
  const float *a = A.data_ptr<float>(), *b = B.data_ptr<float>(), *c = C.data_ptr<float>();
  float* d = D.data_ptr<float>();
  auto pack = [](T lo, T hi) {
    uint16_t l, h;
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    return (uint32_t)l | ((uint32_t)h << 16);
  };
  ::hfe_emu::launch(dim3(1), dim3(32), 0, [&] {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    auto A2 = [&](int r, int k) { return pack(CVT(a[r * 16 + k]), CVT(a[r * 16 + k + 1])); };
    auto B2 = [&](int k, int n) { return pack(CVT(b[k * 8 + n]), CVT(b[(k + 1) * 8 + n])); };
    float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    hfe_mma::mma16816<T>(acc, A2(g, 2 * t), A2(g + 8, 2 * t), A2(g, 2 * t + 8), A2(g + 8, 2 * t + 8), B2(2 * t, g),
                         B2(2 * t + 8, g));
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
  });
  return D;
}
torch::Tensor mma(torch::Tensor A, torch::Tensor B, torch::Tensor C, bool bf16) {
  return bf16 ? mma_t<__nv_bfloat16, __float2bfloat16_rn>(A, B, C) : mma_t<__half, __float2half_rn>(A, B, C);
}

// A CTA of two warps that misuses CUDA in the way `which` names; returns the emulation's error ("" if none).
std::string misuse(int64_t which) {
  static uint32_t outside[4];
  std::vector<uint32_t> registered(64, 7);
  const ::hfe_emu::Regions readable({{registered.data(), registered.size() * 4}});
  try {
    ::hfe_emu::launch(dim3(2), dim3(64), 256, [&] {
      const int lane = threadIdx.x % 32;
      HFE_DYNAMIC_SMEM(smem);
      const uint32_t base = hfe_mma::shared_addr(smem);
      switch (which) {
        case 0: if (lane != 5) __shfl_sync(0xffffffffu, lane, 0); break;         // a lane skips a collective
        case 1: if (threadIdx.x < 48) __syncthreads(); else __syncwarp(); break;  // half a warp waits elsewhere
        case 2: hfe_mma::lds32(base + 256); break;                                // past the shared memory
        case 3: hfe_mma::lds64(base + 4); break;                                  // misaligned
        case 4: hfe_mma::cp_async16(base, outside); break;                        // not a registered tensor
        case 5: __syncwarp(0xffffu); break;                                       // a partial mask
        case 6: lane < 16 ? __shfl_sync(0xffffffffu, 1, 0) : __shfl_xor_sync(0xffffffffu, 1, 1); break;
        case 7: hfe_mma::cp_async16(base + 16 * (lane % 16), registered.data() + 4 * (lane % 16));  // correct
                hfe_mma::cp_async_commit();
                hfe_mma::cp_async_wait<0>();
                __syncthreads();
                break;
      }
    });
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

int64_t dynamic_smem_address() {
  int64_t at = -1;
  ::hfe_emu::launch(dim3(1), dim3(32), 64, [&] {
    HFE_DYNAMIC_SMEM(smem);
    if (threadIdx.x == 0) at = hfe_mma::shared_addr(smem);
  });
  return at;
}

// A thread's cp.async lands at its wait, not before: the words read before and after the wait.
std::vector<int64_t> lands_at_wait() {
  std::vector<uint32_t> src = {1, 2, 3, 4};
  const ::hfe_emu::Regions readable({{src.data(), 16}});
  std::vector<int64_t> seen;
  ::hfe_emu::launch(dim3(1), dim3(32), 64, [&] {
    HFE_DYNAMIC_SMEM(smem);
    const uint32_t base = hfe_mma::shared_addr(smem);
    if (threadIdx.x == 0) {
      hfe_mma::cp_async16(base, src.data());
      hfe_mma::cp_async16(base + 16, src.data(), 8);  // 8 bytes, then zeros
      hfe_mma::cp_async_commit();
      seen.push_back(hfe_mma::lds32(base));
      hfe_mma::cp_async_wait<0>();
      seen.push_back(hfe_mma::lds32(base + 12));
      seen.push_back(hfe_mma::lds32(base + 20));
      seen.push_back(hfe_mma::lds32(base + 24));
    }
  });
  return seen;
}
"""


@pytest.fixture(scope="module")
def probes():
    from torch.utils.cpp_extension import load_inline

    build = Path(os.environ.get("HF_EFFICIENT_CACHE", Path.home() / ".cache" / "hf_efficient")) / "emu_probes"
    build.mkdir(parents=True, exist_ok=True)
    src = Path(Q.__file__).parent / "cuda"
    return load_inline("hfe_emu_probes", PROBES, functions=["mma", "misuse", "lands_at_wait", "dynamic_smem_address"],
                       extra_include_paths=[str(src)], build_directory=str(build),
                       extra_cflags=["-O1", "-std=c++17", "-fno-strict-aliasing", "-DHFE_MMA_EMULATE"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulated_mma_is_a_matmul(probes, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).to(dtype).float()
    b = torch.randn(16, 8, generator=g).to(dtype).float()
    c = torch.randn(16, 8, generator=g)
    d = probes.mma(a, b, c, dtype == torch.bfloat16)
    # products are exact in float32; 16 float32 additions
    torch.testing.assert_close(d, c + a.double().matmul(b.double()).float(), rtol=1e-6, atol=1e-5)
    # a single nonzero A element and B row pin the fragment layout: D = C + A[r][k] B[k][:] only in row r
    a1 = torch.zeros(16, 16)
    a1[11, 13] = 2.0
    d1 = probes.mma(a1, b, torch.zeros(16, 8), dtype == torch.bfloat16)
    want = torch.zeros(16, 8)
    want[11] = 2.0 * b[13]
    assert torch.equal(d1, want)


@pytest.mark.parametrize("which,message", [
    (0, "deadlock in block"), (1, "deadlock in block"), (2, "outside the 256 bytes"), (3, "misaligned shared access"),
    (4, "outside every input tensor"), (5, "partial mask"), (6, "different warp collectives"), (7, "")],
    ids=["skipped-collective", "divergent-syncthreads", "shared-out-of-bounds", "misaligned", "unregistered-source",
         "partial-mask", "mixed-collectives", "correct"])
def test_emulation_reports_misuse(probes, which, message):
    err = probes.misuse(which)
    assert (message in err) if message else err == "", err


def test_cp_async_lands_at_the_wait(probes):
    before, after, partial, zero = probes.lands_at_wait()
    assert before == 0xFFFFFFFF  # shared memory starts as 0xFF bytes: the copy had not landed
    assert (after, partial, zero) == (4, 2, 0)  # 16 bytes; then 8 bytes read and 8 zero-filled


def test_dynamic_shared_memory_does_not_start_at_zero(probes):
    """As on a GPU, static shared variables come first: code may not assume the dynamic part is aligned to more
    than 16 bytes (the mma kernel aligns its 3-bit table itself)."""
    assert probes.dynamic_smem_address() == 16


def test_fuzz_runs_the_emulated_kernel(tmp_path):
    """``benchmarks.quant_fuzz --kernels mma-emu``: the GPU fuzz's cases through the kernel's code on the CPU."""
    import json

    from benchmarks.quant_fuzz import main

    main(["--kernels", "mma-emu", "--cases", "6", "--seed", "7", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "quant_fuzz_emu.json").read_text())["rows"]
    assert [(r["kernel"], r["cases"], r["failed_cases"]) for r in rows] == [("mma-emu", 6, 0)]
    with pytest.raises(SystemExit, match="on its own"):
        main(["--kernels", "mma,mma-emu", "--out", str(tmp_path)])


def test_fuzz_names_its_worst_case_and_reruns_it_alone():
    """The fuzz names the case behind its worst relative error, and ``only=`` reruns that case of the same seed
    alone with the same weights and x (so a GPU run's worst case can be looked at again)."""
    import re

    from hf_efficient.kernels.quant_reference import fuzz

    full = fuzz("mma-emu", cases=8, seed=11, device="cpu")
    i = int(re.match(r"case (\d+): ", full["worst_case"]).group(1))
    again = fuzz("mma-emu", cases=8, seed=11, device="cpu", only=i)
    assert again["cases"] == 1 and again["worst_case"] == full["worst_case"]
    assert again["worst_err_over_sum_abs_xw"] == full["worst_err_over_sum_abs_xw"] > 0
    other = fuzz("mma-emu", cases=8, seed=11, device="cpu", only=(i + 1) % 8)
    assert other["worst_case"].split(":")[0] != full["worst_case"].split(":")[0]
    with pytest.raises(ValueError, match="only=8 names no case of 8"):
        fuzz("mma-emu", cases=8, seed=11, device="cpu", only=8)
