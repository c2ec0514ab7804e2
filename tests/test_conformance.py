"""Conformance suite: every registered quantization method goes through the same life cycle.

load (quantize on load) -> forward vs the dequantized reference -> save -> reload in a fresh process (and a
refused load without the import) -> LoRA -> torch.compile -> damaged checkpoints. A new method is a new row
in :data:`ROWS`; :func:`test_every_registered_method_has_a_row` fails until it has one.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hf_efficient
from hf_efficient import registry
from hf_efficient.checkpoint import CheckpointError
from hf_efficient.integrations.transformers import QuantizationLoadError
from hf_efficient.quantization import QuantLinear, reference_only
from tests.quant_checkpoints import load, rewrite, save_tiny_float

# method -> a config that quantizes a tiny Llama on load (hidden 64, MLP 96: group 32 divides both)
ROWS = {
    "afpq": lambda: hf_efficient.AFPQConfig(bits=4, group_size=32, fmt="fp"),
    "mofq": lambda: hf_efficient.MoFQConfig(bits=4, group_size=32, candidates=["int4_sym", "fp4_sym"],
                                            selection="weight_mse"),
    "lut": lambda: hf_efficient.LUTConfig(bits=2, group_size=32),
}
IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 77, 8, 120]])


def test_every_registered_method_has_a_row():
    assert sorted(registry.register_all().quantization) == sorted(ROWS)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_tiny_float(tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module")
def saved(float_dir, tmp_path_factory):
    """Each method's model quantized on load, its logits, and its saved checkpoint."""
    out = {}
    for method, make in ROWS.items():
        m = load(float_dir, quantization_config=make())
        d = tmp_path_factory.mktemp(method)
        m.save_pretrained(d)
        with torch.no_grad():
            logits = m(IDS).logits
        torch.save(logits, d / "expected.pt")
        out[method] = (m, d)
    return out


@pytest.fixture(scope="module")
def fresh_process_loads(saved, tmp_path_factory):
    """One new interpreter with the import (bit-exact reload) and one without (must refuse), for all rows."""
    dirs = {m: str(d) for m, (_, d) in saved.items()}
    ids = tmp_path_factory.mktemp("ids") / "ids.pt"
    torch.save(IDS, ids)
    body = textwrap.dedent(f"""
        import json, sys, torch
        IMPORT_LINE
        from transformers import AutoModelForCausalLM
        res = {{}}
        for method, d in {dirs!r}.items():
            try:
                m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
                with torch.no_grad():
                    res[method] = bool(torch.equal(m(torch.load({str(ids)!r})).logits, torch.load(d + "/expected.pt")))
            except Exception as e:
                res[method] = type(e).__name__ + ": " + str(e)[:300]
        print("RESULT", json.dumps(res))
    """)
    results = {}
    for key, imp in (("with_import", "import hf_efficient"), ("without_import", "")):
        r = subprocess.run([sys.executable, "-c", body.replace("IMPORT_LINE", imp)], capture_output=True, text=True, timeout=600)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        assert line, r.stderr[-3000:]
        results[key] = json.loads(line[-1][len("RESULT "):])
    return results


@pytest.mark.parametrize("method", ROWS)
def test_load_converts_every_linear_and_freezes_it(method, saved):
    m, _ = saved[method]
    names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    qnames = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert names == ["lm_head"] and len(qnames) == 14
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.rsplit(".", 2)[0] in qnames)


@pytest.mark.parametrize("method", ROWS)
def test_forward_matches_the_dequantized_reference(method, saved, float_dir):
    m, _ = saved[method]
    ref = load(float_dir)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, QuantLinear):
                lin = ref.get_submodule(name)
                lin.weight.copy_(mod.dequantize(torch.float32))
        with reference_only():
            got = m(IDS).logits
        want = ref(IDS).logits
    # Same dequantized weights, same float32 matmuls up to summation order: a few ulps of the logits' scale.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("method", ROWS)
def test_reload_in_a_fresh_process_is_bit_exact(method, fresh_process_loads):
    assert fresh_process_loads["with_import"][method] is True, fresh_process_loads["with_import"][method]


@pytest.mark.parametrize("method", ROWS)
def test_load_without_the_import_is_refused(method, fresh_process_loads):
    got = fresh_process_loads["without_import"][method]
    assert got is not True and "RuntimeError" in str(got) and "mismatched" in str(got), got


@pytest.mark.parametrize("method", ROWS)
def test_lora_trains_only_adapters(method, saved):
    from peft import LoraConfig

    from hf_efficient.integrations.peft import get_peft_model

    m = load(saved[method][1])
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    before = pm(IDS).logits.detach()
    loss = pm(IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    after = pm(IDS).logits.detach()
    assert not torch.equal(before, after)  # B starts at zero; one step moves the output
    with pytest.raises(NotImplementedError, match="re-quantization"):
        pm.merge_and_unload()


@pytest.mark.parametrize("option", ["use_dora", "lora_bias"])
def test_lora_refuses_what_it_does_not_do(option, saved):
    from peft import LoraConfig

    from hf_efficient.integrations.peft import get_peft_model

    m = load(saved["afpq"][1])
    with pytest.raises(ValueError, match=f"{option}=True.*not supported"):
        get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj"], **{option: True}))


def test_lora_refuses_mixed_adapter_batches(saved):
    from peft import LoraConfig

    from hf_efficient.integrations.peft import get_peft_model

    pm = get_peft_model(load(saved["afpq"][1]), LoraConfig(r=4, target_modules=["q_proj"])).eval()
    with pytest.raises(NotImplementedError, match="adapter_names"):
        pm(IDS.repeat(2, 1), adapter_names=["default", "__base__"])


@pytest.mark.parametrize("method", ROWS)
def test_torch_compile_matches_eager(method, saved):
    m, _ = saved[method]
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, m(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ROWS)
def test_damaged_checkpoints_are_refused(method, saved, tmp_path):
    d = saved[method][1]
    sd = load_file(d / "model.safetensors")
    scale = next(k for k in sorted(sd) if k.startswith("model.layers.1.") and sd[k].is_floating_point()
                 and k.rsplit(".", 1)[1].startswith("scales"))
    with pytest.raises(QuantizationLoadError, match="missing"):
        load(rewrite(d, tmp_path / "missing", lambda s: s.pop(scale)))

    def nan(s):
        s[scale][0, 0] = float("nan")

    with pytest.raises(CheckpointError, match=scale.replace(".", r"\.") + " holds 1 non-finite"):
        load(rewrite(d, tmp_path / "nan", nan))
