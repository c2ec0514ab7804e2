"""QuantLinear's resident-layout seam: one copy of the weights, checkpoints always in the stored layout."""
from __future__ import annotations

import pytest
import torch

from hf_efficient.quantization.linear import QuantLinear, ResidentLayout


def _unpacked_layout(layer: QuantLinear) -> ResidentLayout:
    """A stand-in kernel layout: codes unpacked to uint8 plus the params, converted back exactly."""
    st = layer.storage()
    tensors = {"codes": layer.codes().clone(), **{p: st[p].clone() for p in layer.fmt.param_names}}

    def to_storage(lay: QuantLinear) -> dict:
        from hf_efficient.quantization.packing import pack_codes

        out = {"qweight": pack_codes(lay.layout_tensor("codes"), lay.fmt.bits)}
        out.update({p: lay.layout_tensor(p) for p in lay.fmt.param_names})
        return out

    return ResidentLayout("test-unpacked", tensors, to_storage)


@pytest.mark.parametrize("fmt", ["int4_asym", "fp4_asym", "nf3_asym", "int8_sym"])
def test_adopt_keeps_one_copy_and_checkpoint_layout(fmt):
    lin = torch.nn.Linear(100, 24, bias=True)
    q = QuantLinear.from_linear(lin, fmt, group_size=32)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    w = q.dequantize()
    x = torch.randn(3, 100)
    y = q(x)
    q.adopt_layout(_unpacked_layout(q))
    assert q.layout.kind == "test-unpacked" and "layout=test-unpacked" in repr(q)
    assert q.qweight.numel() == 0 and all(getattr(q, p).numel() == 0 for p in q.fmt.param_names)
    after = q.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=0)
    torch.testing.assert_close(q(x), y, rtol=0, atol=0)
    q.release_layout()
    assert q.layout is None and not hasattr(q, "_rl_codes")
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_state_dict_into_adopted_layer():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 8), "int4_asym", group_size=32)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    other = QuantLinear.from_linear(torch.nn.Linear(64, 8), "int4_asym", group_size=32)
    other.adopt_layout(_unpacked_layout(other))
    other.load_state_dict(sd)
    assert other.layout is None
    torch.testing.assert_close(other.dequantize(), q.dequantize(), rtol=0, atol=0)


def test_adopted_tensors_follow_to_and_load_quantized_releases():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 8), "nf4_asym", group_size=32)
    q.adopt_layout(_unpacked_layout(q))
    q.to(torch.float64)  # buffers of integer dtype stay, float ones convert like any buffer
    assert q.layout_tensor("codes").dtype == torch.uint8
    codes, params = q.codes(), q.params()
    q.load_quantized(codes, {p: t.float() for p, t in params.items()})
    assert q.layout is None and q.qweight.numel() > 0


@pytest.mark.parametrize("fmt", ["int4_asym", "fp4_asym", "nf3_sym", "int2_asym", "int8_sym"])
def test_rtn_in_row_blocks_equals_whole_tensor(fmt, monkeypatch):
    """Quantize-on-load works on blocks of rows (bounded temporaries): the codes and scales must not depend on
    the block size, including blocks smaller than one row and a last short block."""
    from hf_efficient import formats
    from hf_efficient.quantization import linear
    from hf_efficient.quantization.packing import pack_codes, unpack_codes

    f = formats.get_format(fmt)
    w = torch.randn(37, 300)
    whole = linear.rtn_quantize(w, f, 64, torch.float16)
    for elements in (600, 1, 299 * 5):
        monkeypatch.setattr(linear, "RTN_CHUNK_ELEMENTS", elements)
        codes, params = linear.rtn_quantize(w, f, 64, torch.float16)
        assert torch.equal(codes, whole[0]) and all(torch.equal(params[k], whole[1][k]) for k in params)
    packed = pack_codes(whole[0], f.bits)
    assert torch.equal(unpack_codes(packed, f.bits, 300), whole[0])
    assert torch.equal(pack_codes(whole[0].view(1, 37, 300), f.bits)[0], packed)
