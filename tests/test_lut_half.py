"""fp16 embedding/head tables (hf_efficient.quantization.lut.half, C++ half_gemm) and what loading them keeps."""
import os
import subprocess
import sys

import pytest
import torch

from hf_efficient.kernels import lut_cpu


def _need_cpp():
    if not lut_cpu.available():
        pytest.fail("the C++ extension is not built (make setup)")


@pytest.mark.parametrize("m,k,n", [(1, 576, 300), (2, 17, 9), (3, 64, 4), (4, 100, 33), (5, 40, 70), (64, 48, 130),
                                   (1, 1, 1), (7, 0, 5)])
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_half_gemm_matches_float64_reference(m, k, n, isa, monkeypatch):
    """Every engine (and both paths: <= 4 rows the fp16 kernels, more the widened-block GEMM) equals x @ W^T on
    the widened weight up to float32 summation order."""
    _need_cpp()
    if isa not in lut_cpu.available_isas():
        pytest.skip(f"this CPU has no {isa}")  # the engines it has are all checked
    monkeypatch.setenv("HF_EFFICIENT_LUT_ISA", isa)
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, generator=g)
    w = (torch.randn(n, k, generator=g) * 0.05).half()
    y = torch.ops.hf_efficient.half_gemm(x, w)
    ref = x.double() @ w.double().t()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * max(1.0, k ** 0.5))


def test_half_gemm_rejects_bad_input():
    _need_cpp()
    op = torch.ops.hf_efficient.half_gemm
    with pytest.raises(RuntimeError, match="weight must be float16"):
        op(torch.randn(1, 4), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="x must be float32"):
        op(torch.randn(1, 4).double(), torch.randn(3, 4).half())
    with pytest.raises(RuntimeError, match="4 features, the weight 5"):
        op(torch.randn(1, 4), torch.randn(3, 5).half())


def test_half_linear_takes_the_kernel_and_matches_the_reference():
    _need_cpp()
    from hf_efficient.quantization.lut.half import half_linear, half_linear_reference

    x = torch.randn(2, 3, 40)
    w, b = (torch.randn(24, 40) * 0.1).half(), torch.randn(24)
    torch.testing.assert_close(half_linear(x, w, b), half_linear_reference(x, w, b), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    half_linear(xg, w).sum().backward()  # inputs that need gradients: the differentiable reference
    torch.testing.assert_close(xg.grad, w.float().sum(0).expand_as(x))


def test_keep_embeddings_in_float16(tiny_llama):
    """The tied table becomes one fp16 buffer shared by embedding and head; the model still reports and computes
    float32, and its logits are those of the fp32 model with the table rounded to fp16."""
    _need_cpp()
    import copy

    from hf_efficient.quantization.lut.half import HalfEmbedding, HalfHead, keep_embeddings_in

    model = copy.deepcopy(tiny_llama)
    rounded = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        rounded.get_input_embeddings().weight.copy_(rounded.get_input_embeddings().weight.half().float())
    names = keep_embeddings_in(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert names == ["model.embed_tokens", "lm_head"]
    assert type(emb) is HalfEmbedding and type(head) is HalfHead
    assert emb.weight is head.weight and emb.weight.dtype == torch.float16
    assert "weight" in emb._buffers and not any(p.dtype == torch.float16 for p in model.parameters())
    assert model.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = model(ids).logits, rounded(ids).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert set(model.state_dict()) == set(tiny_llama.state_dict())
    with pytest.raises(ValueError, match="narrower than float32"):
        keep_embeddings_in(model, torch.float64)


def _storages(model) -> dict[int, int]:
    """Bytes of each distinct storage the model's parameters and buffers hold."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in list(model.parameters()) + list(model.buffers()) if t.numel()}


def test_load_with_fp16_embeddings_holds_the_packed_layers_and_one_fp16_table(tiny_llama_dir):
    """Resident tensors after a quantized load with embedding_dtype=float16: the LUT layouts, one fp16 table (no
    float32 copy left anywhere), the float norms and rotary frequencies; nothing else."""
    _need_cpp()
    from hf_efficient.models import load_model
    from hf_efficient.quantization.linear import QuantLinear
    from hf_efficient.quantization.lut import LUTConfig

    model = load_model(tiny_llama_dir, quantization_config=LUTConfig(bits=4, group_size=32),
                       embedding_dtype=torch.float16)[0]
    table = model.get_input_embeddings().weight
    assert table.dtype == torch.float16 and table is model.get_output_embeddings().weight
    expected = table.numel() * 2
    for m in model.modules():
        if isinstance(m, QuantLinear):
            expected += sum(m.layout_tensor(n).untyped_storage().nbytes() for n in m.layout.names)
        elif not list(m.children()) and not isinstance(m, torch.nn.Embedding) and m is not model.lm_head:
            held = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))  # norms, rotary
            expected += sum(t.numel() * t.element_size() for t in held)
    assert sum(_storages(model).values()) == expected
    ids = torch.randint(0, table.shape[0], (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_whole_tensor_reads_use_get_tensor(tiny_llama_dir):
    """Within read_weights_without_mmap a whole-tensor slice read is get_tensor (one buffer); partial slices
    keep working."""
    import transformers.modeling_utils as mu

    from hf_efficient.models import read_weights_without_mmap

    path = str(tiny_llama_dir / "model.safetensors")
    with read_weights_without_mmap():
        with mu.safe_open(path, framework="pt", backend="mmap") as f:
            name = "model.embed_tokens.weight"
            calls, handle = [], f._handle

            class Spy:
                def get_tensor(self, n):
                    calls.append(n)
                    return handle.get_tensor(n)

                def get_slice(self, n):
                    return handle.get_slice(n)

            f._handle = Spy()
            sl = f.get_slice(name)
            whole, part = sl[...], sl[2:5]
            assert calls == [name]
            torch.testing.assert_close(part, whole[2:5])
            assert sl.get_shape() == list(whole.shape)
            f._handle = handle


def test_packing_in_row_blocks_equals_one_block(monkeypatch):
    """prepare_spec packs rows in blocks (bounded temporaries); the stream is the one a single block gives."""
    _need_cpp()
    g = torch.Generator().manual_seed(5)
    for bits, grid in ((4, None), (2, None), (4, torch.linspace(-1, 1, 16)[None])):
        codes = torch.randint(0, 2 ** bits, (100, 80), generator=g, dtype=torch.uint8)
        ng = (lut_cpu.ref.padded_k(80) + 15) // 16
        coef = torch.rand(100, ng, 1, generator=g) + 0.5
        zcoef = torch.zeros(100, ng) if grid is not None else coef[..., 0] * 3
        monkeypatch.setattr(lut_cpu, "PACK_CODES", 1 << 30)
        whole = lut_cpu.prepare_spec(codes, bits, 16, grid, coef, zcoef).qweight.clone()
        monkeypatch.setattr(lut_cpu, "PACK_CODES", 1)  # one tile (32 rows) per block
        assert torch.equal(lut_cpu.prepare_spec(codes, bits, 16, grid, coef, zcoef).qweight, whole)


@pytest.mark.parametrize("device,hidden", [("cpu", True), ("cuda", False)])
def test_demo_worker_command_hides_unused_imports_on_cpu(device, hidden):
    from hf_efficient.cli.demo_worker import CPU_UNUSED_IMPORTS, worker_command

    cmd = worker_command(device)
    probe = cmd[2].split("from hf_efficient")[0] + (
        "import importlib.util; print([importlib.util.find_spec(n) is None for n in %r])" % (CPU_UNUSED_IMPORTS,))
    out = subprocess.run([cmd[0], "-c", probe], capture_output=True, text=True, env=dict(os.environ), check=True)
    if hidden:
        assert out.stdout.strip() == str([True] * len(CPU_UNUSED_IMPORTS))
    else:
        assert "sys.modules.update" not in cmd[2]
    assert cmd[0] == sys.executable and "from hf_efficient.cli.demo_worker import main" in cmd[2]
