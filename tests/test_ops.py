"""The proof-of-path ops: C++ scale_add (CPU), Triton scale_add (interpreter on CPU, CUDA on the GPU)."""
import pytest
import torch

from hf_efficient.kernels.reference import scale_add_reference
from hf_efficient.ops import HAS_CPP_OPS, scale_add

SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (3, 5, 7), (64, 300)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def test_cpp_ops_are_built():
    assert HAS_CPP_OPS, "csrc/ extension missing: reinstall with pip install --no-build-isolation -e ."


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_scale_add_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    y = torch.randn(shape, generator=g).to(dtype)
    expected = scale_add_reference(x, y, 0.37) if dtype != torch.float64 else 0.37 * x + y
    torch.testing.assert_close(scale_add(x, y, 0.37), expected, atol=0, rtol=0)


def test_cpp_scale_add_extreme_and_noncontiguous():
    x = torch.tensor([0.0, -0.0, 1e38, -1e38, float("inf"), float("nan"), 1e-45])
    y = torch.tensor([0.0, 0.0, 1e38, 0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(scale_add(x, y, 2.0), 2.0 * x + y, equal_nan=True, atol=0, rtol=0)
    a = torch.randn(8, 6).t()
    b = torch.randn(6, 8)
    torch.testing.assert_close(scale_add(a, b, -1.5), -1.5 * a + b)


def test_cpp_scale_add_bad_input():
    with pytest.raises(RuntimeError, match="same shape"):
        scale_add(torch.zeros(3), torch.zeros(4), 1.0)
    with pytest.raises(RuntimeError, match="same dtype"):
        scale_add(torch.zeros(3), torch.zeros(3, dtype=torch.float64), 1.0)


def test_op_registration_and_compile():
    from torch.library import opcheck

    x, y = torch.randn(5, 3), torch.randn(5, 3)
    opcheck(torch.ops.hf_efficient.scale_add.default, (x, y, 2.0))
    f = torch.compile(lambda a, b: scale_add(a, b, 0.5) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, y), x + 2 * y)


@pytest.mark.parametrize("n", [1, 100, 1024, 1500, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_scale_add_matches_reference(n, dtype):
    # On CPU this runs under TRITON_INTERPRET=1 (set in conftest); on the GPU machine, natively.
    from hf_efficient.kernels.scale_add import scale_add as triton_scale_add

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(device, dtype)
    y = torch.randn(n, generator=g).to(device, dtype)
    # The GPU compiler may fuse the multiply-add into one FMA (one rounding instead of two), so only
    # the interpreter is bit-exact; on CUDA the default dtype tolerances apply.
    exact = dict(atol=0, rtol=0) if device == "cpu" else {}
    torch.testing.assert_close(triton_scale_add(x, y, -0.25, block=256), scale_add_reference(x, y, -0.25), **exact)
    with pytest.raises(ValueError, match="must match"):
        triton_scale_add(x, y[:-1] if n > 1 else y.double(), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_op_dispatches_to_triton(dtype):
    x = torch.randn(3, 1000, device="cuda", dtype=dtype)
    y = torch.randn(3, 1000, device="cuda", dtype=dtype)
    torch.testing.assert_close(scale_add(x, y, 1.25), scale_add_reference(x, y, 1.25))  # FMA: see above
    f = torch.compile(lambda a, b: scale_add(a, b, 1.25), fullgraph=True)
    torch.testing.assert_close(f(x, y), scale_add_reference(x, y, 1.25))


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


@pytest.mark.parametrize("nbytes", [0, 5, (2 << 20) - 1, (5 << 20) + 3])
def test_hugepage_empty(nbytes):
    """Weight-stream storage: the requested size, writable end to end, 2 MiB aligned once it is that large."""
    import hf_efficient  # noqa: F401

    t = torch.ops.hf_efficient.hugepage_empty(nbytes)
    assert t.dtype == torch.uint8 and t.shape == (nbytes,) and t.is_contiguous()
    t.fill_(7)
    assert int(t.sum()) == 7 * nbytes
    if nbytes >= 2 << 20:
        assert t.data_ptr() % (2 << 20) == 0
    with pytest.raises(RuntimeError, match="nbytes must be >= 0"):
        torch.ops.hf_efficient.hugepage_empty(-1)
