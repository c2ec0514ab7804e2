"""AdamA with 2 gloo processes on CPU: gradients are averaged over ranks each micro-batch before the fold.

Two paths: (a) no DDP wrapper, ``process_group`` set: each hook all-reduces its gradient (memory
saving kept); (b) DDP wrapper, ``fold_on_hook=False`` + ``fold_grads()`` after each micro-batch
(DDP reduces every micro-batch: no ``no_sync``). Both must equal the single-process reference fed
the rank-averaged micro-batch gradients, and (c) hooks under an initialised process group without
``process_group`` must refuse to fold un-reduced gradients.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.adama_reference import RefAdamA, batches, micro_grads, mlp

N, STEPS, WORLD = 2, 3, 2


def _data(rank):
    return batches(100 + rank, N * STEPS)


def _worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from hf_efficient.optim import AdamA

    try:
        data = _data(rank)
        results = {}
        # (a) hooks + all-reduce per parameter
        model = mlp()
        opt = AdamA(model.parameters(), lr=1e-2, weight_decay=0.0, accumulation_steps=N,
                    process_group=dist.group.WORLD)
        for s in range(STEPS):
            for x, y in data[s * N:(s + 1) * N]:
                ((model(x) - y).pow(2).mean() / N).backward()
            opt.step()
        results["hook"] = [p.detach().clone() for p in model.parameters()]
        # (b) DDP, reduced every micro-batch, folded after each backward
        ddp = torch.nn.parallel.DistributedDataParallel(mlp())
        opt = AdamA(ddp.parameters(), lr=1e-2, weight_decay=0.0, accumulation_steps=N, fold_on_hook=False)
        for s in range(STEPS):
            for x, y in data[s * N:(s + 1) * N]:
                ((ddp(x) - y).pow(2).mean() / N).backward()
                opt.fold_grads()
            opt.step()
        results["ddp"] = [p.detach().clone() for p in ddp.module.parameters()]
        # (c) hooks under DDP without a process group: refused
        ddp = torch.nn.parallel.DistributedDataParallel(mlp())
        opt = AdamA(ddp.parameters(), lr=1e-2)
        x, y = data[0]
        try:
            (ddp(x) - y).pow(2).mean().backward()
            results["refused"] = ""
        except RuntimeError as e:
            results["refused"] = str(e)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # reference: one process, micro-batch gradient = mean over ranks of the ranks' gradients
    probe = mlp()
    ref = RefAdamA(list(mlp().parameters()), lr=1e-2, n=N)
    data = [_data(r) for r in range(WORLD)]
    for s in range(STEPS):
        params = [p.float() for p in ref.params]
        per_rank = [micro_grads(probe, data[r][s * N:(s + 1) * N], N, params=params) for r in range(WORLD)]
        ref.step([[sum(g) / WORLD for g in zip(*(per_rank[r][i] for r in range(WORLD)))] for i in range(N)])
    for key in ("hook", "ddp"):
        for r in range(WORLD):
            for p, q in zip(res[r][key], ref.params):
                torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6, msg=f"{key} rank {r}")
    for r in range(WORLD):
        assert "before DDP has reduced them" in res[r]["refused"]
