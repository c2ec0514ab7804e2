"""The op surface: every op is declared (and faked) in hf_efficient/ops.py; the C++ op library loads, and its memory
ops (bandwidth probe, huge-page storage) behave."""
import re
from pathlib import Path

import pytest
import torch

from hf_efficient.ops import HAS_CPP_OPS


def test_cpp_ops_are_built():
    assert HAS_CPP_OPS, "csrc/ extension missing: reinstall with pip install --no-build-isolation -e ."


def _or_words_reference(buf: torch.Tensor) -> int:
    """OR of the buffer's little-endian 64-bit words, the last one zero-padded (as a signed int64)."""
    import numpy as np

    b = buf.contiguous().view(torch.uint8).flatten().numpy()
    b = np.concatenate([b, np.zeros((-b.size) % 8, dtype=np.uint8)])
    return int(np.bitwise_or.reduce(b.view("<u8"), initial=np.uint64(0)).astype(np.int64))


@pytest.mark.parametrize("nbytes", [0, 1, 7, 127, 129, 4096 + 77, (1 << 20) + 300, (3 << 20) + 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_read_probe_checksum(nbytes, threads):
    """The bandwidth probe must read every byte: its checksum is the OR of all words, tails and chunks included."""
    import hf_efficient  # noqa: F401  (loads the extension)

    g = torch.Generator().manual_seed(nbytes)
    # Sparse single bits, so a skipped chunk or tail changes the checksum.
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    if nbytes:
        idx = torch.randint(0, nbytes, (min(nbytes, 40),), generator=g)
        buf[idx] = (1 << torch.randint(0, 8, idx.shape, generator=g)).to(torch.uint8)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.hf_efficient.read_probe(buf)
    finally:
        torch.set_num_threads(prev)
    assert got == _or_words_reference(buf)
    if nbytes:
        buf[-1] = 0x80  # the very last byte lands in the top bits of its word
        assert torch.ops.hf_efficient.read_probe(buf) == _or_words_reference(buf)


def test_read_probe_other_dtypes_and_bad_input():
    import hf_efficient  # noqa: F401

    x = torch.arange(1000, dtype=torch.int32)
    assert torch.ops.hf_efficient.read_probe(x) == _or_words_reference(x)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.hf_efficient.read_probe(torch.zeros(8, 8, dtype=torch.uint8).t())


@pytest.mark.parametrize("nbytes", [0, 1, 5, 4097, (2 << 20) - 1, (5 << 20) + 3])
def test_hugepage_empty(nbytes):
    """Weight-stream storage: the requested size, writable end to end, 2 MiB aligned once it is that large and
    on a 4 KiB page boundary below that."""
    import hf_efficient  # noqa: F401

    t = torch.ops.hf_efficient.hugepage_empty(nbytes)
    assert t.dtype == torch.uint8 and t.shape == (nbytes,) and t.is_contiguous()
    t.fill_(7)
    assert int(t.sum()) == 7 * nbytes
    if nbytes >= 2 << 20:
        assert t.data_ptr() % (2 << 20) == 0
    elif nbytes:
        assert t.data_ptr() % 4096 == 0
    with pytest.raises(RuntimeError, match="nbytes must be >= 0"):
        torch.ops.hf_efficient.hugepage_empty(-1)


def test_ops_are_declared_in_one_module():
    """Op schemas and fakes live only in hf_efficient/ops.py; kernel modules only register device kernels."""
    root = Path(__file__).resolve().parents[1]
    declare = re.compile(r"torch\.library\.(custom_op|define|register_fake|impl_abstract|Library)\b|\.register_fake\b")
    found = {str(p.relative_to(root)) for p in (root / "hf_efficient").rglob("*.py")
             if declare.search(p.read_text())}
    assert found == {"hf_efficient/ops.py"}


def test_every_tensor_op_has_a_fake():
    """Every ``hf_efficient::`` op that returns tensors traces under torch.compile (a fake implementation)."""
    import hf_efficient.attention.seer  # noqa: F401  (registers the seer CUDA kernels)
    import hf_efficient.quantization.gpu  # noqa: F401
    from torch._library.simple_registry import singleton

    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("hf_efficient::"))
    # eager-only ops: a str/int query and two buffer utilities that never run inside a compiled graph
    eager = {"hf_efficient::lut_isa", "hf_efficient::half_isa", "hf_efficient::lut_max_rows",
             "hf_efficient::read_probe", "hf_efficient::hugepage_empty"}
    assert set(names) >= eager | {"hf_efficient::quant_matmul", "hf_efficient::quant_mma", "hf_efficient::lut_gemm"}
    missing = [n for n in names if n not in eager and singleton.find(n).fake_impl.kernel is None]
    assert not missing
