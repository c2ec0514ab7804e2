"""L0 structured pruning of ParakeetForCTC: gates, expected size, physical pruning, trainer, speech data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import ParakeetCTCConfig, ParakeetForCTC, TrainingArguments

from hf_efficient.pruning import (HardConcreteGate, L0PruningConfig, LayerwiseDistiller, ParakeetL0Pruner,
                                  PrunedParakeetForCTC, PruningTrainer, count_params, prune_parakeet, unit_counts)
from hf_efficient.pruning.parakeet import MODULE_KINDS, _MODULE_ATTR, unit_params


def tiny_model(layers=3, bias=True, hidden=32, heads=4, inter=48, dtype=torch.float64):
    enc = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
               subsampling_conv_channels=8, num_mel_bins=16, subsampling_factor=4, conv_kernel_size=5,
               attention_bias=bias, convolution_bias=bias, layerdrop=0.0, dropout=0.0, activation_dropout=0.0,
               attention_dropout=0.0)
    m = ParakeetForCTC(ParakeetCTCConfig(vocab_size=12, pad_token_id=11, encoder_config=enc))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so pruning BN channels is exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.2)
    return m.to(dtype).eval()


def batch(dtype=torch.float64, b=3, t=60, mels=16):
    x = torch.randn(b, t, mels, dtype=dtype)
    am = torch.ones(b, t, dtype=torch.long)
    am[1, 41:] = 0
    am[2, 23:] = 0
    return x, am


# --- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(target_sparsity=1.0), "target_sparsity"), (dict(target_sparsity=-0.1), "target_sparsity"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(structures=("heads", "layers")), "structures"),
    (dict(structures=()), "structures"), (dict(init_keep_prob=1.0), "init_keep_prob"),
    (dict(stretch=(0.0, 1.1)), "stretch"), (dict(beta=0), "beta"), (dict(lambda_lr=-1), "lambda_lr"),
    (dict(format_version=99), "format_version"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        L0PruningConfig(**kwargs)


def test_config_ramp_and_roundtrip():
    c = L0PruningConfig(target_sparsity=0.6, warmup_steps=10, distill_layers=[0, 2])
    assert [c.target_at(s) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.3, 0.6, 0.6])
    assert [c.target_at(s, start=0.2) for s in (0, 5, 10)] == pytest.approx([0.2, 0.4, 0.6])
    assert L0PruningConfig.from_dict(c.to_dict()) == c


# --- hard-concrete gates ----------------------------------------------------------------------
def test_hard_concrete_prob_nonzero_matches_sampling():
    g = HardConcreteGate(5)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    n = 4000
    freq = torch.stack([g.sample() > 0 for _ in range(n)]).float().mean(0)
    p = g.prob_nonzero().detach()
    # 5 binomial standard deviations: fails by chance with probability < 1e-6 per gate
    assert torch.all((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n))
    s = g.sample()
    assert s.min() >= 0 and s.max() <= 1


def test_hard_concrete_init_and_deterministic_mask():
    g = HardConcreteGate(10, init_keep_prob=0.7)
    assert g.prob_nonzero().detach() == pytest.approx(torch.full((10,), 0.7), abs=1e-6)
    with torch.no_grad():
        g.log_alpha.copy_(torch.linspace(-4, 4, 10))
    m = g.deterministic()
    keep = round(g.expected_l0().item())
    assert int((m > 0).sum()) == keep
    assert torch.all(m[-keep:] > 0) and torch.all(m[:-keep] == 0)  # the largest log alphas survive
    g.eval()
    assert torch.equal(g(), m)
    with pytest.raises(ValueError, match="n=0"):
        HardConcreteGate(0)


# --- size model -------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_unit_params_match_real_modules(bias):
    m = tiny_model(bias=bias)
    up, counts = unit_params(m), unit_counts(m)[0]
    block = m.encoder.layers[0]
    for kind in MODULE_KINDS:
        norm = getattr(block, {"ffn1": "norm_feed_forward1", "attn": "norm_self_att", "conv": "norm_conv",
                               "ffn2": "norm_feed_forward2"}[kind])
        real = sum(p.numel() for p in getattr(block, _MODULE_ATTR[kind]).parameters())
        real += sum(p.numel() for p in norm.parameters())
        assert up[kind][0] * counts[kind] + up[kind][1] == real, kind


def test_expected_size_equals_pruned_size_for_saturated_gates():
    m = tiny_model()
    p = ParakeetL0Pruner(m)
    assert p.expected_params().item() < p.total_params  # init_keep_prob < 1
    with torch.no_grad():
        for g in p.gates.values():
            g.log_alpha.copy_(torch.where(torch.rand(g.n) < 0.5, -30.0, 30.0))
    pruned = prune_parakeet(m, p.masks())
    assert p.expected_params().item() == pytest.approx(count_params(pruned), rel=1e-6)
    assert p.expected_sparsity().item() == pytest.approx(1 - count_params(pruned) / count_params(m), abs=1e-6)


# --- masked model == physically pruned model --------------------------------------------------
def _set_gates(p, case):
    with torch.no_grad():
        for k, g in p.gates.items():
            g.log_alpha.normal_(0.0, 3.0)
        if case == "module_off":
            p.gates["1_attn_module"].log_alpha.fill_(-30)
            p.gates["0_ffn2_module"].log_alpha.fill_(-30)
            p.gates["2_conv_module"].log_alpha.fill_(-30)
        elif case == "units_all_off":
            for k in ("0_attn_units", "1_conv_units", "2_ffn1_units"):
                p.gates[k].log_alpha.fill_(-30)
            for k in ("0_attn_module", "1_conv_module", "2_ffn1_module"):
                p.gates[k].log_alpha.fill_(30)
        elif case == "all_on":
            for g in p.gates.values():
                g.log_alpha.fill_(30)


@pytest.mark.parametrize("case, bias", [("random", True), ("module_off", True), ("units_all_off", True),
                                        ("all_on", True), ("random", False), ("units_all_off", False)])
def test_pruned_model_matches_masked_model(case, bias):
    m = tiny_model(bias=bias)
    x, am = batch()
    ref = m(input_features=x, attention_mask=am).logits
    p = ParakeetL0Pruner(m)
    _set_gates(p, case)
    with torch.no_grad():
        masked = m(input_features=x, attention_mask=am).logits
        pruned = prune_parakeet(m, p.masks())
        out = pruned(input_features=x, attention_mask=am).logits
    # float64 throughout: the only difference is summation order over fewer terms
    torch.testing.assert_close(out, masked, rtol=0, atol=1e-12)
    if case == "all_on":
        torch.testing.assert_close(masked, ref, rtol=0, atol=1e-10)
        assert count_params(pruned) == count_params(m)
    else:
        assert count_params(pruned) < count_params(m)
    p.remove()
    torch.testing.assert_close(m(input_features=x, attention_mask=am).logits, ref, rtol=0, atol=0)


def test_pruned_model_saves_and_reloads(tmp_path):
    m = tiny_model(dtype=torch.float32)
    p = ParakeetL0Pruner(m)
    _set_gates(p, "module_off")
    pruned = prune_parakeet(m, p.masks()).eval()
    pruned.save_pretrained(tmp_path)
    back = PrunedParakeetForCTC.from_pretrained(tmp_path).eval()
    x, am = batch(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(input_features=x, attention_mask=am).logits,
                                   pruned(input_features=x, attention_mask=am).logits, rtol=0, atol=0)
    assert back.config.pruning_layout == pruned.config.pruning_layout
    with pytest.raises(Exception, match="mismatch"):
        ParakeetForCTC.from_pretrained(tmp_path)  # a plain load must fail loudly, never half-load


def test_pruned_model_is_faster_when_much_smaller():
    m = tiny_model(layers=2, hidden=64, heads=4, inter=256, dtype=torch.float32)
    p = ParakeetL0Pruner(m)
    with torch.no_grad():
        for k, g in p.gates.items():
            g.log_alpha.fill_(-30 if k.endswith("_units") else 30)
            if k.endswith("_units"):
                g.log_alpha[:1] = 30  # one unit per group survives
    pruned = prune_parakeet(m, p.masks())
    assert count_params(pruned) < 0.5 * count_params(m)
    assert all(c[k] == 1 for c in unit_counts(pruned) for k in MODULE_KINDS)


def test_pruner_rejects_other_models():
    with pytest.raises(ValueError, match="ParakeetForCTC"):
        ParakeetL0Pruner(torch.nn.Linear(2, 2))


# --- distillation -----------------------------------------------------------------------------
def test_distiller_identity_and_mask():
    d = LayerwiseDistiller(8, (1, 2))
    h = tuple(torch.randn(2, 5, 8) for _ in range(3))
    assert d(h, h).item() == pytest.approx(-1.0, abs=1e-6)
    other = tuple(t.clone() for t in h)
    other[1][0, 4] += 10.0  # a difference on a padded frame only
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 4] = False
    assert d(h, other, mask).item() == pytest.approx(-1.0, abs=1e-6)
    assert d(h, other).item() > -0.9
    with pytest.raises(ValueError, match="distill layer 5"):
        LayerwiseDistiller(8, (5,))(h, h)


# --- trainer ----------------------------------------------------------------------------------
class _RandomSpeech(torch.utils.data.Dataset):
    def __init__(self, n=8, t=64, mels=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, t, mels, generator=g)
        self.y = torch.randint(0, 10, (n, 6), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_features": self.x[i], "attention_mask": torch.ones(self.x.shape[1], dtype=torch.long),
                "labels": self.y[i]}


def test_pruning_trainer_steps_logs_and_prunes(tmp_path):
    m = tiny_model(layers=2, dtype=torch.float32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             report_to=[], remove_unused_columns=False, learning_rate=1e-3, disable_tqdm=True,
                             use_cpu=True, save_strategy="no")
    cfg = L0PruningConfig(target_sparsity=0.5, warmup_steps=2, gate_lr=0.5, lambda_lr=0.5)
    tr = PruningTrainer(model=m, args=args, train_dataset=_RandomSpeech(), pruning_config=cfg)
    gates0 = {k: g.log_alpha.detach().clone() for k, g in tr.pruner.gates.items()}
    tr.train()
    logs = [entry for entry in tr.state.log_history if "expected_sparsity" in entry]
    assert len(logs) == 2
    for key in ("ctc_loss", "distill_loss", "lagrangian", "lambda1", "lambda2", "target_sparsity"):
        assert all(math.isfinite(entry[key]) for entry in logs)
    assert logs[-1]["target_sparsity"] == pytest.approx(0.5)
    assert logs[0]["lambda1"] <= 0  # below the ramped target from the first step: lambda1 only goes down
    assert any(not torch.equal(g.log_alpha, gates0[k]) for k, g in tr.pruner.gates.items())
    assert not torch.equal(tr.lambdas.detach(), torch.zeros(2))
    teacher = tr.teacher.state_dict()
    assert all(torch.equal(teacher[k], before[k]) for k in before)  # the teacher is frozen
    pruned = tr.pruned_model()
    x, am = batch(torch.float32, mels=16)
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(input_features=x, attention_mask=am).logits,
                                   tr.model(input_features=x, attention_mask=am).logits, rtol=1e-4, atol=1e-5)


def test_lagrangian_lambda_ascends():
    """Below target (s < t) lambda1 must go down, which makes the penalty push sparsity up."""
    m = tiny_model(layers=1, dtype=torch.float32)
    p = ParakeetL0Pruner(m)
    lam = torch.nn.Parameter(torch.zeros(2))
    lam.register_hook(lambda g: -g)
    gap = p.expected_sparsity() - 0.9
    (lam[0] * gap + lam[1] * gap ** 2).backward()
    opt = torch.optim.SGD([lam], lr=1.0)
    opt.step()
    assert lam[0].item() == pytest.approx(gap.item(), abs=1e-6) and lam[0].item() < 0
    # and the gates feel a push towards sparsity: d(loss)/d(log_alpha) > 0 once lambda1 < 0
    gap = p.expected_sparsity() - 0.9
    (lam[0].detach() * gap).backward()
    assert all(g.log_alpha.grad.min() > 0 for g in p.gates.values())


# --- speech data ------------------------------------------------------------------------------
def test_text_normalisation_and_tokenizer():
    from hf_efficient.pruning.speech import CharTokenizer, normalize_text

    assert normalize_text("O, 'tis Hamlet's--  FATHER!\n") == "o tis hamlet's father"
    tok = CharTokenizer()
    ids = tok.encode("to be")
    b = tok.blank_id
    assert tok.ctc_decode([b] + [ids[0], ids[0], b, ids[1]] + [ids[2], b, ids[3], ids[3], ids[4]]) == "to be"
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("Hamlet!")


def test_resample_preserves_a_tone():
    from hf_efficient.pruning.speech import resample

    sr, f = 22050, 440.0
    x = np.sin(2 * np.pi * f * np.arange(sr) / sr).astype(np.float32)
    y = resample(x, sr, 16000)
    assert len(y) == 16000
    ref = np.sin(2 * np.pi * f * np.arange(16000) / 16000)
    assert np.max(np.abs(y - ref)) < 1e-3  # an integer number of periods: band-limited resampling is exact


def test_espeak_synthesis_and_dataset(tmp_path):
    from hf_efficient.pruning.speech import (TRAIN_VOICES, CharTokenizer, EspeakSynthesizer, SpeechCollator,
                                             SpeechSpec, build_speech_dataset, word_error_rate)
    from transformers import ParakeetFeatureExtractor

    synth = EspeakSynthesizer()
    x = synth("to be or not to be", "en-us+f2", rate=175)
    assert 0.5 < len(x) / 16000 < 3.0 and np.abs(x).max() > 0.05
    with pytest.raises(ValueError, match="voice"):
        synth("hello", "xx-nowhere")
    spec = SpeechSpec("eval", 3, TRAIN_VOICES[:2], seed=1)
    ds = build_speech_dataset(spec, cache_dir=tmp_path, progress=False)
    again = build_speech_dataset(spec, cache_dir=tmp_path, progress=False)
    assert ds["text"] == again["text"] and len(ds) == 3
    b = SpeechCollator(ParakeetFeatureExtractor(feature_size=16), CharTokenizer())([ds[0], ds[1]])
    assert b["input_features"].shape[0] == 2 and b["input_features"].shape[-1] == 16
    assert (b["labels"] >= 0).sum() == sum(len(t) for t in ds["text"][:2])
    assert word_error_rate(["a b c d"], ["a x c"]) == pytest.approx(0.5)


def test_magnitude_masks_keep_the_largest_units():
    from hf_efficient.pruning import magnitude_masks

    m = tiny_model(layers=1)
    with torch.no_grad():
        m.encoder.layers[0].feed_forward1.linear2.weight[:, 5] = 0.0  # neuron 5 contributes nothing
        m.encoder.layers[0].self_attn.o_proj.weight[:, 8:16] = 0.0  # neither does head 1
    full = magnitude_masks(m, 1.0)
    assert all(bool(v.all()) for v in full.values())
    half = magnitude_masks(m, 0.5)
    counts = unit_counts(m)[0]
    for kind in MODULE_KINDS:
        assert int(half[f"0_{kind}_units"].sum()) == math.ceil(counts[kind] / 2)
    assert half["0_ffn1_units"][5] == 0 and half["0_attn_units"][1] == 0
    assert count_params(prune_parakeet(m, half)) < count_params(m)
    with pytest.raises(ValueError, match="keep_fraction"):
        magnitude_masks(m, 0.0)


def test_pruning_trainer_refuses_a_ready_optimizer(tmp_path):
    m = tiny_model(layers=1, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="optimizers"):
        PruningTrainer(model=m, args=args, optimizers=(torch.optim.SGD(m.parameters(), lr=0.1), None))
