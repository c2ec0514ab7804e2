"""Quantize-on-load streams: transformers' threaded loader is off while our conversion runs, and the user's
setting of its switch comes back afterwards (the GPU load peak of quantize-on-load is measured by
benchmarks/quant_load_memory.py)."""
from __future__ import annotations

import os

import pytest
import torch

from hf_efficient import AFPQConfig
from hf_efficient.integrations import transformers as integ
from tests.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("float_llama")
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).save_pretrained(d)
    return d


@pytest.mark.parametrize("user_setting", [None, "0"])
def test_quantize_on_load_runs_sequentially_and_restores_the_switch(float_dir, monkeypatch, user_setting):
    from transformers import AutoModelForCausalLM

    if user_setting is None:
        monkeypatch.delenv(integ.ASYNC_LOAD_ENV, raising=False)
    else:
        monkeypatch.setenv(integ.ASYNC_LOAD_ENV, user_setting)
    seen = []
    convert = integ.QuantizeOnLoad.convert

    def spy(self, *args, **kwargs):
        seen.append(os.environ.get(integ.ASYNC_LOAD_ENV))
        return convert(self, *args, **kwargs)

    monkeypatch.setattr(integ.QuantizeOnLoad, "convert", spy)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32))
    assert len(seen) == 14 and set(seen) == {"1"}  # 7 linears x 2 layers, each converted with the pool off
    assert os.environ.get(integ.ASYNC_LOAD_ENV) == user_setting
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_a_prequantized_reload_leaves_the_switch_alone(float_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv(integ.ASYNC_LOAD_ENV, raising=False)
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32)) \
        .save_pretrained(tmp_path)
    seen = []
    orig = integ.HfEfficientQuantizer._process_model_after_weight_loading

    def spy(self, model, **kwargs):
        seen.append(os.environ.get(integ.ASYNC_LOAD_ENV))
        return orig(self, model, **kwargs)

    monkeypatch.setattr(integ.HfEfficientQuantizer, "_process_model_after_weight_loading", spy)
    AutoModelForCausalLM.from_pretrained(tmp_path)
    assert seen == [None]


def test_loader_budgets_packed_bytes_not_the_float_placeholders(float_dir, monkeypatch):
    """transformers sizes its one-shot accelerator warm-up allocation (and device_map="auto") from the quantizer's
    ``param_element_size``: it must come to the packed layers plus the unquantized tensors. Counting the float
    placeholders made the H200 load peak the float model plus the packed one (benchmarks/quant_load_memory.md)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import get_total_byte_count

    from hf_efficient.quantization import QuantLinear

    budgets = []
    orig = integ.HfEfficientQuantizer._process_model_before_weight_loading

    def spy(self, model, **kwargs):
        out = orig(self, model, **kwargs)
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        budget = get_total_byte_count(model, {n: "cuda:0" for n in names}, self)["cuda:0"]
        packed = unquantized = 0
        for mod in model.modules():
            own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
            for t_name, t in own:
                if isinstance(mod, QuantLinear) and t_name == "weight":
                    continue  # the placeholder: replaced by the packed buffers
                nbytes = t.numel() * t.element_size()
                if isinstance(mod, QuantLinear):
                    packed += nbytes
                else:
                    unquantized += nbytes
        budgets.append((budget, packed, unquantized))
        return out

    monkeypatch.setattr(integ.HfEfficientQuantizer, "_process_model_before_weight_loading", spy)
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32))
    (budget, packed, unquantized), = budgets
    assert packed > 0 and budget == packed + unquantized


@pytest.mark.parametrize("config", [AFPQConfig(bits=4, group_size=32, fmt="nf"), AFPQConfig(bits=4, group_size=32)],
                         ids=["afpq-nf4", "int4"])
def test_a_cpu_load_decodes_through_the_fused_step(float_dir, config):
    """Any quantization config loaded on the CPU gets the fused one-token decode step (not only LUTConfig), and
    greedy generate gives the same tokens as the layers' own forward."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from hf_efficient.kernels import lut_cpu
    from hf_efficient.quantization.lut import enable_fast_decode

    if not lut_cpu.available():
        pytest.fail("the C++ extension is not built")
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config).eval()
    layers = model.model.layers
    assert all(type(layer) is not LlamaDecoderLayer and isinstance(layer, LlamaDecoderLayer) for layer in layers)
    ids = torch.tensor([[5, 17, 3, 9]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    fused = model.generate(ids, **kw)
    assert enable_fast_decode(model, enabled=False) == ["model.layers.0", "model.layers.1"]
    assert all(type(layer) is LlamaDecoderLayer for layer in layers)
    assert torch.equal(model.generate(ids, **kw), fused)


def test_capped_load_benchmark_finds_the_out_of_memory_behind_a_conversion_error():
    """transformers reports an out-of-memory inside a weight conversion as a RuntimeError of its own, chained to the
    OOM; quant_load_memory's capped load records that as a failed load under the cap, and lets any other error
    through (a run on an H100 lost its capped-load row to the first case)."""
    from benchmarks.quant_load_memory import _out_of_memory

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 86.00 MiB")
    try:
        try:
            raise oom
        except torch.OutOfMemoryError:
            raise RuntimeError("We encountered some issues during automatic conversion of the weights") from None
    except RuntimeError as e:
        wrapped = e
    assert _out_of_memory(wrapped) is oom and _out_of_memory(oom) is oom
    assert _out_of_memory(RuntimeError("shape mismatch")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["int4_asym_g128", "afpq_nf3_asym_g64"])
def test_gpu_quantize_on_load_fits_under_a_memory_cap(tmp_path_factory, config):
    """Issue 14, part 2, on the device: a one-block 7B-shaped bf16 checkpoint quantized while transformers loads it
    peaks within packed + the largest bf16 tensor + 5 %, and loads with the allocator capped at that bound
    (``set_per_process_memory_fraction``; expandable segments, since the cap counts reserved memory and fixed
    segments fragment past the allocated peak). Each load runs in its own process (benchmarks.quant_load_memory),
    so no other test's allocations count. The mma packer's whole-matrix int64 temporaries broke this bound."""
    from benchmarks.common import run_child
    from benchmarks.quant_load_memory import GB, largest_tensor_bytes, write_checkpoint

    path = str(tmp_path_factory.getbasetemp() / "llama7b_shaped_1_layer")
    write_checkpoint(path, 1)
    free = run_child("benchmarks.quant_load_memory", "--dir", path, "--child", config)
    assert free is not None, "the uncapped load failed (its stderr is printed above)"
    bound = 1.05 * (free["packed_GB"] + largest_tensor_bytes(path) / GB)
    assert free["peak_load_GB"] <= bound, (free, bound)
    capped = run_child("benchmarks.quant_load_memory", "--dir", path, "--child", config, "--cap-gb", str(bound),
                       env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert capped is not None and capped["loads_under_cap"], capped
