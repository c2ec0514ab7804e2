"""AdamA under ``transformers.Trainer`` across 2 gloo CPU processes (what ``torchrun``/``accelerate launch`` do).

The model is DDP-wrapped by Trainer; ``adama_optimizers`` builds AdamA with ``fold_on_hook=False`` and
``AdamACallback`` folds the reduced gradient after every micro-batch (``sync_each_batch``). Checked:
(a) the same parameters as one process with the same global batch (2 processes x 1 sequence vs 1 x 2),
(b) a checkpoint written by the 2-process run resumes on 2 processes to the same parameters as the
uninterrupted run.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import tiny_llama_config

WORLD, N, STEPS = 2, 2, 4
TIMEOUT_S = 900  # ~30 s on an idle 2-core machine; generous for a shared one, but never a hung CI job


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=16, vocab=256):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(out_dir, per_device, resume=None, save_steps=None):
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from hf_efficient.optim import AdamACallback, adama_optimizers

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=N, max_steps=STEPS,
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1, report_to=[], use_cpu=True,
        seed=0, max_grad_norm=0.0, weight_decay=0.1, disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential", save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}})
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), optimizers=adama_optimizers(model, args),
                      callbacks=[AdamACallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    full = _train(os.path.join(out, "run"), 1, save_steps=2)
    opt = full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer
    result = {"full": [p.detach().clone() for p in full.model.parameters()], "fold_on_hook": opt.fold_on_hook,
              "world": full.args.world_size}
    resumed = _train(os.path.join(out, "run"), 1, resume=os.path.join(out, "run", "checkpoint-2"))
    result["resumed"] = [p.detach().clone() for p in resumed.model.parameters()]
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing gloo down while the other still talks can hang it
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_two_processes_equal_one_process_and_resume(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=2):  # raises if a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-process Trainer run did not finish within {TIMEOUT_S} s")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["world"] == WORLD and not r["fold_on_hook"] for r in res)  # DDP path: fold after each micro-batch
    single = _train(str(tmp_path / "single"), WORLD)  # one process, same global micro-batch of 2 sequences
    for r in range(WORLD):
        for p, q, s in zip(res[r]["full"], res[r]["resumed"], single.model.parameters()):
            # float32 reductions in another order (gloo all-reduce of two halves vs one batch of two)
            torch.testing.assert_close(p, s.detach(), rtol=1e-4, atol=1e-5)
            assert torch.equal(p, q)  # resume across ranks is exact
    assert not torch.equal(res[0]["full"][0], _initial_embedding())  # it trained


def _initial_embedding():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).model.embed_tokens.weight.detach()
