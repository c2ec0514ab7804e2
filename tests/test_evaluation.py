import json
import math

import pytest
import torch

from hf_efficient import evaluation as ev


def _nll_given_prefix(model, ids, t, history):
    """-log p(ids[t] | ids[max(0, t-history):t]) computed directly, one token at a time."""
    prefix = ids[max(0, t - history):t][None]
    with torch.no_grad():
        logp = torch.log_softmax(model(prefix).logits[0, -1].double(), -1)
    return -logp[ids[t]].item()


def test_perplexity_whole_sequence_matches_cross_entropy(tiny_llama):
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = tiny_llama(ids[None], labels=ids[None]).loss.item()
    assert ev.perplexity(tiny_llama, ids, context=64, progress=False) == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("n,context,stride", [(37, 16, 8), (50, 16, 5), (17, 16, 15), (16, 16, 8), (2, 8, 4)])
def test_perplexity_sliding_window_by_hand(tiny_llama, n, context, stride):
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n))
    # By hand: tokens 1..context-1 see their full prefix; then each window of `context` ends
    # `stride` later and its last `stride` tokens are scored with the window's history.
    nll, t = 0.0, 1
    for t in range(1, min(context, n)):
        nll += _nll_given_prefix(tiny_llama, ids, t, history=t)
    end = min(context, n)
    while end < n:
        new_end = min(end + stride, n)
        begin = new_end - context
        for t in range(end, new_end):
            nll += _nll_given_prefix(tiny_llama, ids, t, history=t - begin)
        end = new_end
    expected = math.exp(nll / (n - 1))
    got = ev.perplexity(tiny_llama, ids, context=context, stride=stride, progress=False)
    assert got == pytest.approx(expected, rel=1e-4)


def test_perplexity_bad_arguments(tiny_llama):
    ids = torch.arange(10)
    with pytest.raises(ValueError, match="1-D"):
        ev.perplexity(tiny_llama, ids[None])
    with pytest.raises(ValueError, match="at least 2"):
        ev.perplexity(tiny_llama, ids[:1])
    with pytest.raises(ValueError, match="stride"):
        ev.perplexity(tiny_llama, ids, context=8, stride=8)
    with pytest.raises(ValueError, match="context"):
        ev.perplexity(tiny_llama, ids, context=1)


def test_speed_memory_size_and_table(tiny_llama):
    with ev.PeakMemory("cpu") as mem:
        speed = ev.measure_speed(tiny_llama, prompt_len=16, new_tokens=4, repeats=2)
    assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0
    # decode is timed on its own: a step costs at least a microsecond, so no absurd rate can come out
    assert speed["decode_tok_s"] < 1e6
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        ev.measure_speed(tiny_llama, prompt_len=4, new_tokens=0)
    assert mem.peak_bytes > 50 * 2**20  # a Python process with torch loaded
    n_params = sum(p.numel() for p in tiny_llama.parameters())  # tied embedding counted once
    assert ev.state_dict_bytes(tiny_llama) == 4 * n_params + sum(
        b.numel() * b.element_size() for _, b in tiny_llama.named_buffers() if _ in tiny_llama.state_dict())
    r = ev.EvalResult("tiny", ppl=12.5, decode_tok_s=3.0, size_mb=1.0)
    table = ev.format_table([r, ev.EvalResult("empty")])
    assert "| tiny | 12.500 |" in table and "| empty |" in table


def test_evaluate_end_to_end_and_json(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = torch.randint(0, 1000, (70,), generator=torch.Generator().manual_seed(0))
    res = ev.evaluate(model, tok, "tiny", ids, context=32, prompt_len=8, new_tokens=3, repeats=1, progress=False)
    assert res.ppl > 1 and res.decode_tok_s > 0 and res.peak_mem_mb > 0 and isinstance(res.sample, str)
    out = tmp_path / "r.json"
    ev.write_json([res], out, {"context": 32})
    payload = json.loads(out.read_text())
    assert payload["results"][0]["name"] == "tiny" and payload["settings"] == {"context": 32}
    assert {"device", "date", "torch", "transformers"} <= set(payload["environment"])


def test_decode_steps_carry_the_cache_in_the_current_api(recwarn):
    """A one-token step on the cache equals the full forward, and passes it under the name this transformers takes
    (``cache`` since 5.24; ``past_key_values`` there warns and goes away in 5.40)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_efficient.evaluation import cache_kwarg

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        name = cache_kwarg()
        step = model(ids[:, 5:], use_cache=True, **{name: getattr(out, name)})
        full = model(ids)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
