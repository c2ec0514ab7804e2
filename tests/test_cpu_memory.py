"""Memory properties of a quantized model on the CPU: what it keeps resident, how it is loaded and evaluated."""
import sys

import pytest
import torch

from hf_efficient import evaluation as ev


def _file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed memory mappings (Linux)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                a, b = (int(x, 16) for x in parts[0].split("-"))
                out.append((a, b, parts[5]))
    return out


def test_chunked_logits_equal_full_window_logits(tiny_llama, monkeypatch):
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(3))
    assert ev._split_head(tiny_llama) is not None  # a Llama splits into decoder + linear head
    monkeypatch.setattr(ev, "LOGIT_CHUNK", 4)  # several chunks per window, a short remainder merged
    chunked = ev.perplexity(tiny_llama, ids, context=16, stride=5, progress=False)
    monkeypatch.setattr(ev, "_split_head", lambda model: None)
    full = ev.perplexity(tiny_llama, ids, context=16, stride=5, progress=False)
    assert chunked == pytest.approx(full, rel=1e-5)


def test_chunks_cover_every_position_once():
    for n in (1, 3, 4, 9, 64, 65, 130):
        spans = ev._chunks(n, 4)
        assert [i for a, b in spans for i in range(a, b)] == list(range(n))
        assert all(b - a >= 4 for a, b in spans[:-1]) and (len(spans) == 1 or spans[-1][1] - spans[-1][0] >= 4)


def test_head_that_is_not_one_linear_map_is_not_split(tiny_llama):
    class Scaled(type(tiny_llama)):
        def forward(self, *args, **kwargs):  # e.g. logit scaling: the head alone would give other logits
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    scaled = Scaled(tiny_llama.config).eval()
    scaled.load_state_dict(tiny_llama.state_dict())
    assert ev._split_head(scaled) is None
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(scaled(ids[None]).logits[0, :-1], ids[1:]).item()
    assert ev.perplexity(scaled, ids, context=32, progress=False) == pytest.approx(torch.tensor(loss).exp().item(),
                                                                                   rel=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_quantize_on_load_keeps_no_tensor_in_the_checkpoint_file(tiny_llama_dir):
    # Memory-mapped, the float embedding kept a view into model.safetensors and so pinned every page of the
    # float checkpoint that quantization had read.
    from hf_efficient.models import load_model
    from hf_efficient.quantization.lut import LUTConfig

    model = load_model(tiny_llama_dir, quantization_config=LUTConfig(bits=4, group_size=32))[0]
    maps = [(a, b) for a, b, path in _file_mappings() if path.endswith(".safetensors")]
    inside = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if t.numel() and any(a <= t.untyped_storage().data_ptr() < b for a, b in maps)]
    assert inside == []


def test_cpu_lut_layer_holds_only_its_layout(tiny_llama_dir):
    """After adopting the cpu-lut layout a layer's memory is the layout's tensors (+ bias): no stored copy."""
    from hf_efficient.kernels import lut_cpu
    from hf_efficient.models import load_model
    from hf_efficient.quantization.linear import QuantLinear
    from hf_efficient.quantization.lut import LUTConfig
    from hf_efficient.quantization.lut.layer import KIND

    if not lut_cpu.available():
        pytest.fail("the C++ extension is not built (make setup)")
    model = load_model(tiny_llama_dir, quantization_config=LUTConfig(bits=4, group_size=32))[0]
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.layout is not None and m.layout.kind == KIND for m in layers)
    for m in layers:
        layout = {n: m.layout_tensor(n) for n in m.layout.names}
        held = {id(t): t for t in list(m.buffers()) + list(m.parameters()) if t.numel()}
        expected = {id(t): t for t in list(layout.values()) + ([m.bias] if m.bias is not None else [])}
        assert held.keys() == expected.keys()
        assert all(getattr(m, n).numel() == 0 for n in m.storage_names())
        # The stream holds codes + coefficients: about bits/8 bytes a weight, not a float copy.
        assert layout["stream"].numel() < m.in_features * m.out_features
    # Saving still writes the stored layout, rebuilt from the stream.
    sd = model.state_dict()
    name = next(n for n, m in model.named_modules() if m is layers[0])
    assert sd[name + ".qweight"].numel() > 0
