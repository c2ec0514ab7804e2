"""BitDistiller in Trainer: the callback's loss equals the reference, accumulation, AdamA, LoRA, resume, data."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_efficient.distill import (BitDistillerCallback, BitDistillerConfig, FakeQuantLinear, distill_loss,
                                  fake_quant_disabled)

VOCAB = 128


def _tiny():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=1)).eval()


def _dataset(n=8, seqlen=16):
    import datasets

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, seqlen), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True,
                dataloader_num_workers=0, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(model, tmp_path, cb, **kw):
    from transformers import Trainer

    optimizers = kw.pop("optimizers", (None, None))
    return Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=_dataset(), callbacks=[cb],
                   optimizers=optimizers)


@pytest.mark.parametrize("loss", ["cakld", "fkl", "rkl", "ce"])
def test_callback_loss_equals_reference(tmp_path, loss, one_thread):
    model = _tiny()
    teacher = copy.deepcopy(model)
    cfg = BitDistillerConfig(bits=2, group_size=32, loss=loss, clip_grid=2, clip_samples=2, clip_seqlen=8)
    cb = BitDistillerCallback(cfg)
    trainer = _trainer(model, tmp_path, cb)
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, w0)  # the latent weights trained
    if loss == "cakld":
        # beta = the float teacher's mean top-1 probability on the first batches (all 4 here).
        with torch.no_grad():
            ids = torch.tensor(_dataset()["input_ids"])
            p = torch.softmax(teacher(ids).logits[:, :-1], -1).amax(-1).mean().item()
        assert cb.beta == pytest.approx(p, rel=1e-4)
    # The hook's loss on a batch equals distill_loss computed by hand from the two models.
    batch = torch.tensor(_dataset()["input_ids"][:2])
    model.train()
    cb._handle = model.register_forward_hook(cb._hook, with_kwargs=True)
    out = model(input_ids=batch, labels=batch)
    cb._handle.remove()
    with torch.no_grad():
        t = cb.teacher(batch).logits if loss != "ce" else None
    want = distill_loss(model(input_ids=batch).logits, t, batch, kind=loss, beta=cb.beta)
    assert torch.allclose(out.loss, want, rtol=1e-5)
    assert [h for h in trainer.state.log_history if "loss" in h]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, one_thread):
    """Two micro-batches of 2 with accumulation give the weights of one batch of 4 (num_items_in_batch)."""
    outs = []
    for bs, acc in ((4, 1), (2, 2)):
        model = _tiny()
        cfg = BitDistillerConfig(bits=3, group_size=32, loss="cakld", beta=0.4, clip=False)
        _trainer(model, tmp_path / f"{bs}", BitDistillerCallback(cfg), per_device_train_batch_size=bs,
                 gradient_accumulation_steps=acc, max_steps=1, optim="sgd", learning_rate=1.0).train()
        outs.append(model.model.layers[0].self_attn.q_proj.weight.detach().clone())
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_with_adama(tmp_path, one_thread):
    from hf_efficient.optim import adama_optimizers

    model = _tiny()
    args = _args(tmp_path, max_grad_norm=0.0, gradient_accumulation_steps=2)
    cfg = BitDistillerConfig(bits=2, group_size=32, clip=False, beta=0.5)
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer = _trainer(model, tmp_path, BitDistillerCallback(cfg), optimizers=adama_optimizers(model, args),
                       max_grad_norm=0.0, gradient_accumulation_steps=2)
    trainer.train()
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, w0)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_with_lora_self_teacher(tmp_path, one_thread):
    import peft

    from hf_efficient.distill import prepare_qat

    model = _tiny()
    cfg = BitDistillerConfig(bits=2, group_size=32, clip=False, loss="fkl")
    ids = torch.tensor(_dataset()["input_ids"][:2])
    with torch.no_grad():
        float_logits = model(ids).logits
    prepare_qat(model, cfg)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    base_w = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    cb = BitDistillerCallback(cfg, teacher="self")
    _trainer(pm, tmp_path, cb).train()
    # The base stays frozen; the adapters trained; the self-teacher (adapters off, fake quant off) is the float model.
    assert torch.equal(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_w)
    assert any(p.abs().sum() > 0 for n, p in pm.named_parameters() if "lora_B" in n)
    assert torch.allclose(cb._teacher_logits(pm, ids, None), float_logits, atol=1e-5)


def test_prepared_model_needs_a_teacher(tmp_path, one_thread):
    from hf_efficient.distill import prepare_qat

    model = prepare_qat(_tiny(), BitDistillerConfig(bits=2, group_size=32, clip=False))
    with pytest.raises(ValueError, match="teacher"):
        _trainer(model, tmp_path, BitDistillerCallback(BitDistillerConfig(bits=2, group_size=32))).train()


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="BitDistillerConfig"):
        BitDistillerCallback({"bits": 2})
    with pytest.raises(ValueError, match="teacher="):
        BitDistillerCallback(BitDistillerConfig(), teacher="copy")


def test_resume_from_checkpoint(tmp_path, one_thread):
    """A resumed run (teacher given) ends with the weights of an uninterrupted one; teacher=None refuses."""
    cfg = BitDistillerConfig(bits=2, group_size=32, clip=False, beta=0.5)
    full = _tiny()
    teacher = copy.deepcopy(full)
    _trainer(full, tmp_path, BitDistillerCallback(cfg), max_steps=4, save_strategy="steps", save_steps=2).train()
    resumed = _tiny()
    tr = _trainer(resumed, tmp_path, BitDistillerCallback(cfg, teacher=teacher), max_steps=4,
                  save_strategy="steps", save_steps=2)
    tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    w = lambda m: m.model.layers[0].mlp.gate_proj.weight.detach()  # noqa: E731
    assert torch.allclose(w(resumed), w(full), atol=1e-6)
    again = _tiny()
    with pytest.raises(ValueError, match="resuming"):
        _trainer(again, tmp_path, BitDistillerCallback(cfg), max_steps=4, save_strategy="steps",
                 save_steps=2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_generate_training_data(tiny_llama_dir, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_efficient.distill import generate_training_data

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ds = generate_training_data(model, tok, n_samples=3, prompt_len=6, gen_len=4, batch_size=2,
                                prompts=["To be, or not"], progress=False)
    again = generate_training_data(model, tok, n_samples=3, prompt_len=6, gen_len=4, batch_size=2,
                                   prompts=["To be, or not"], progress=False)
    assert ds["input_ids"] == again["input_ids"]  # repeatable in the seed
    assert len(ds) == 3 and all(len(r) == 10 for r in ds["input_ids"])
    user = tok("To be, or not", add_special_tokens=False).input_ids
    assert ds["input_ids"][0][6 - len(user):6] == user  # the user prompt comes first, right-aligned
    with pytest.raises(ValueError, match="temperature"):
        generate_training_data(model, tok, n_samples=1, temperature=0.0)


def test_fake_quant_disabled_restores_state():
    from hf_efficient.distill import prepare_qat

    model = prepare_qat(_tiny(), BitDistillerConfig(bits=2, group_size=32, clip=False))
    layer = model.model.layers[0].mlp.up_proj
    layer.quant_enabled = False
    with fake_quant_disabled(model):
        assert not model.model.layers[0].self_attn.q_proj.quant_enabled
    assert model.model.layers[0].self_attn.q_proj.quant_enabled and not layer.quant_enabled


def test_cli_distill_writes_a_reloadable_checkpoint_and_resumes(tiny_llama_dir, tmp_path, one_thread):
    import json

    from transformers import AutoModelForCausalLM

    from hf_efficient.cli import main
    from hf_efficient.quantization.linear import QuantLinear

    out = tmp_path / "run"
    common = ["distill", "--model", str(tiny_llama_dir), "--out", str(out), "--bits", "3", "--group-size", "32",
              "--samples", "4", "--prompt-len", "6", "--gen-len", "6", "--batch", "2", "--clip-grid", "2",
              "--save-every", "1", "--device", "cpu", "--no-progress"]
    assert main(common + ["--steps", "1"]) == 0
    assert (out / "checkpoints" / "checkpoint-1").is_dir() and (out / "data" / "dataset_info.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert main(common + ["--steps", "2", "--json", str(tmp_path / "r.json")]) == 0  # resumes from step 1
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert main(common[:-1] + ["--steps", "1", "--fmt", "nf", "--bits", "2"]) == 2  # invalid: NF2 does not exist
