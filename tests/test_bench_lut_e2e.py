"""The end-to-end CPU benchmark's own measuring pieces (benchmarks/lut_e2e.py), on a tiny model."""
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.lut_e2e import _Stamps, generate_decode_tok_s, weight_types
from tests.conftest import tiny_llama_config


def _eos_first_model():
    """A tiny Llama whose greedy choice is always token 0, made its EOS: plain generate stops after one token."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False, eos_token_id=0)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.generation_config.eos_token_id = 0
    return model


def test_generate_decode_times_every_step_even_past_eos(one_thread):
    model = _eos_first_model()
    prompt = torch.randint(1, 256, (1, 5))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + 1  # the premise: without forcing, EOS ends generate at once
    rate = generate_decode_tok_s(model, prompt, new_tokens=6, repeats=2)
    assert math.isfinite(rate) and rate > 0


def test_stamps_leave_scores_unchanged_and_count_steps(one_thread, tiny_llama):
    from transformers import LogitsProcessorList

    prompt = torch.randint(0, 256, (1, 4))
    stamps = _Stamps()
    plain = tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                                do_sample=False, pad_token_id=0)
    stamped = tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                  min_new_tokens=5, do_sample=False, pad_token_id=0,
                                  logits_processor=LogitsProcessorList([stamps]))
    assert torch.equal(plain, stamped)
    assert len(stamps.times) == 5 and stamps.times == sorted(stamps.times)


def test_generate_decode_rejects_too_few_tokens(tiny_llama):
    with pytest.raises(ValueError, match="new_tokens"):
        generate_decode_tok_s(tiny_llama, torch.zeros(1, 3, dtype=torch.long), new_tokens=1, repeats=1)


def test_weight_types_of_the_embedded_gguf():
    from hf_efficient.models import embedded_gguf_path

    shares = weight_types(str(embedded_gguf_path()))
    parts = [p.rsplit(" ", 1) for p in shares.split(", ")]
    assert sum(float(pct.rstrip("%")) for _, pct in parts) == pytest.approx(100, abs=len(parts))
    assert parts[0][0] == "Q4_1"  # the embedded file's own type carries most weights
