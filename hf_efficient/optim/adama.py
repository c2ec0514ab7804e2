"""AdamA ("Adam Accumulation"): fold each micro-batch's gradient into Adam's states during backward.

Update rule, for one optimizer step made of N micro-batches whose gradients *as they arrive* are
h_1 ... h_N (the usual accumulation recipe scales each micro-batch loss by 1/N, so h_i = g_i / N
where g_i is micro-batch i's mean gradient and G = sum_i h_i is the accumulated gradient)::

    at the first micro-batch of the step:   m <- b1 * m          v <- b2 * v
    for every micro-batch i:                m += (1 - b1) * h_i  v += (1 - b2) * N * h_i**2
    at step():   t += 1;  p <- p * (1 - lr * wd)                       (decoupled weight decay)
                 p <- p - lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)

m is exactly AdamW's (b1 m + (1 - b1) G). v holds (1 - b2) * mean_i g_i**2 instead of AdamW's
(1 - b2) * (mean_i g_i)**2: larger by the variance of the micro-batch gradients. With N = 1 the
two coincide, so AdamA with one micro-batch is AdamW. Every micro-batch's gradient is taken as soon
as it is complete (``register_post_accumulate_grad_hook``), queued and freed (``p.grad = None``);
queued gradients are folded together, one multi-tensor launch per bucket of ``bucket_mb`` (Triton
on CUDA, ``torch._foreach`` ops elsewhere; :mod:`hf_efficient.kernels.adama_fold`), and whatever is
left at the end of backward is folded then. So at most about one bucket of gradients exists at any
time instead of the whole model's.

Consequences a user must know (each raises or is documented, never silent):

* Global-norm gradient clipping is impossible (the global gradient never exists). ``per_param_clip=c``
  clips, per parameter and per micro-batch, the micro-batch mean gradient g_i to norm <= c.
* Sparse gradients are refused; fp16 loss scaling (GradScaler) is not supported (the fold would see
  scaled gradients); bf16 autocast and bf16/fp16 parameters are fine (states fp32 unless state_bits < 32).
* Distributed data parallel: gradients must be reduced before the fold. Either pass
  ``process_group`` (no DDP wrapper; every hook all-reduces its parameter's gradient, so each
  micro-batch costs one full gradient all-reduce instead of one per step), or wrap with DDP, build
  with ``fold_on_hook=False`` and call :meth:`fold_grads` after every micro-batch's backward with
  gradient sync on each micro-batch (same communication; DDP's buckets keep a full-model gradient
  buffer, so this path keeps AdamA's rule but not its memory saving).
"""
from __future__ import annotations

import math
import weakref
from typing import Iterable

import torch
from torch.optim import Optimizer

from . import lowbit

STATE_BITS = (32, 16, 8)
IMPLS = ("auto", "triton", "foreach", "per_tensor")


def _check(name, value, ok: bool, allowed: str):
    if not ok:
        raise ValueError(f"AdamA: {name}={value!r} is invalid; allowed: {allowed}")


def _backend(impl: str, device: torch.device):
    """(fold, update) functions over lists of tensors for ``impl`` on ``device``."""
    if impl == "auto":
        from hf_efficient.kernels import HAS_TRITON

        impl = "triton" if device.type == "cuda" and HAS_TRITON else "foreach"
    if impl == "triton":
        from hf_efficient.kernels import adama_fold as k

        return k.fold_triton, k.update_triton, True
    if impl == "foreach":
        from hf_efficient.kernels import adama_foreach as k

        return k.fold_foreach, k.update_foreach, False
    from hf_efficient.kernels import adama_reference as k

    return k.fold_reference, k.update_reference, False


class AdamA(Optimizer):
    """Adam whose states absorb micro-batch gradients during backward (see the module docstring).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay, default 0.01).
        accumulation_steps: N, the number of micro-batches per ``step()``; it scales the fold of v
            (``N * h_i**2``) so that gradients scaled by 1/N give the mean of squared micro-batch
            gradients. A shorter last window (fewer micro-batches) over-estimates v by N/k for that step.
        state_bits: 32 (fp32 m and v, 8 bytes/parameter), 16 (bf16 m and v, 4 bytes/parameter,
            stochastic rounding by default) or 8 (block-wise 8-bit m and v, :mod:`.lowbit`, for tensors
            with at least ``min_8bit_size`` elements; smaller ones keep fp32 states).
        stochastic_rounding: round re-stored low-bit states stochastically (random numbers from a
            generator seeded with ``seed``, saved in the state dict; on CUDA the kernels' own counter-based
            generator, seeded per launch). Default on: it keeps bf16 and 8-bit states close to fp32 AdamA's final
            loss where round-to-nearest 8-bit falls measurably short (docs/adama.md).
        per_param_clip: if set, clip each parameter's micro-batch mean gradient to this norm before
            folding (the only clipping possible once gradients are freed).
        fold_on_hook: fold in ``register_post_accumulate_grad_hook`` (default, saves gradient memory).
            False: gradients stay until :meth:`fold_grads` or :meth:`step` (the DDP path).
        bucket_mb: gradients are queued as backward produces them and folded together, one launch per
            bucket of about this many MB (and at the end of backward); a larger bucket means fewer
            launches and more gradient memory alive at once.
        impl: "auto" (Triton multi-tensor kernels on CUDA, ``torch._foreach`` ops elsewhere),
            "triton", "foreach", or "per_tensor" (plain torch, one tensor at a time: the reference).
        process_group: a ``torch.distributed`` group to average each gradient over before folding.
        track_grad_norm: keep sum of squared micro-batch mean-gradient norms for logging
            (:meth:`pop_grad_norm`).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, accumulation_steps: int = 1,
                 state_bits: int = 32, block_size: int = 256, min_8bit_size: int = 4096,
                 stochastic_rounding: bool = True, seed: int = 0, per_param_clip: float | None = None,
                 fold_on_hook: bool = True, bucket_mb: float = 32.0, impl: str = "auto", process_group=None,
                 track_grad_norm: bool = False):
        _check("lr", lr, isinstance(lr, (int, float)) and lr >= 0, "a float >= 0")
        _check("betas", betas, len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "two floats in [0, 1)")
        _check("eps", eps, eps >= 0, "a float >= 0")
        _check("weight_decay", weight_decay, weight_decay >= 0, "a float >= 0")
        _check("state_bits", state_bits, state_bits in STATE_BITS, str(STATE_BITS))
        _check("block_size", block_size, isinstance(block_size, int) and block_size > 0, "a positive int")
        _check("per_param_clip", per_param_clip, per_param_clip is None or per_param_clip > 0, "None or > 0")
        _check("bucket_mb", bucket_mb, isinstance(bucket_mb, (int, float)) and bucket_mb >= 0, "a float >= 0")
        _check("impl", impl, impl in IMPLS, str(IMPLS))
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.accumulation_steps = accumulation_steps
        self.state_bits = state_bits
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        self.stochastic_rounding = bool(stochastic_rounding) and state_bits < 32
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._launches = 0  # seeds the kernels' stochastic rounding: a new random stream per launch
        self.per_param_clip = per_param_clip
        self.process_group = process_group
        self.track_grad_norm = track_grad_norm
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.impl = impl
        self._sq_norm: torch.Tensor | None = None
        self._micro_batches = 0
        self._hooks: list = []
        self._pending: dict[tuple, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pending_bytes: dict[tuple, int] = {}
        self._flush_queued = False
        if fold_on_hook:
            self.install_hooks()

    # -- configuration ---------------------------------------------------------------------------
    @property
    def accumulation_steps(self) -> int:
        return self._n

    @accumulation_steps.setter
    def accumulation_steps(self, n: int) -> None:
        _check("accumulation_steps", n, isinstance(n, int) and n >= 1, "an int >= 1")
        self._n = n

    @property
    def fold_on_hook(self) -> bool:
        return bool(self._hooks)

    def install_hooks(self) -> None:
        """Fold (and free) each gradient as soon as backward has accumulated it."""
        if self._hooks:
            return
        ref = weakref.ref(self)  # the model must not keep a dropped optimizer alive

        def hook(p: torch.Tensor) -> None:
            opt = ref()
            if opt is not None and p.grad is not None:
                opt._consume(p)

        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:  # frozen parameters get no gradient and no hook
                    self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_group_index"):
            del self._group_index
        if getattr(self, "_hooks", None):  # groups added after construction get hooks too
            self.remove_hooks()
            self.install_hooks()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- the fold ----------------------------------------------------------------------------------
    def _group_id(self, p) -> int:
        gid = self._group_index.get(id(p)) if hasattr(self, "_group_index") else None
        if gid is None:
            self._group_index = {id(q): i for i, g in enumerate(self.param_groups) for q in g["params"]}
            gid = self._group_index[id(p)]
        return gid

    def _init_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            st["folds"] = 0
            if self.state_bits == 8 and lowbit.quantizable(p, self.min_8bit_size):
                st["exp_avg"] = lowbit.Q8State.zeros(p, True, self.block_size)
                st["exp_avg_sq"] = lowbit.Q8State.zeros(p, False, self.block_size)
            else:
                dtype = torch.bfloat16 if self.state_bits == 16 else torch.float32
                st["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                st["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return st

    def _consume(self, p: torch.Tensor) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("AdamA does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                               "use dense gradients")
        if self.process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.process_group)
            g.div_(dist.get_world_size(self.process_group))
        elif self._hooks and _ddp_world() > 1:
            raise RuntimeError("AdamA folds gradients inside backward, before DDP has reduced them: pass "
                               "process_group=... to reduce each gradient in the hook (and do not wrap the model "
                               "in DDP), or build AdamA(fold_on_hook=False) and call fold_grads() after each "
                               "micro-batch (AdamACallback does this under Trainer)")
        p.grad = None
        self._enqueue(p, g)
        if self._hooks and not self._flush_queued:
            # Fold whatever is still queued when this backward ends (a bucket not yet full).
            ref = weakref.ref(self)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: ref() and ref().flush())
            self._flush_queued = True

    def _enqueue(self, p: torch.Tensor, g: torch.Tensor) -> None:
        key = (self._group_id(p), g.device, g.dtype)
        bucket = self._pending.setdefault(key, {})
        if id(p) in bucket:
            # A second gradient of the same parameter before the fold (reentrant checkpointing calls the
            # hook once per segment): both are parts of one micro-batch's gradient, so they are summed.
            bucket[id(p)] = (p, bucket[id(p)][1] + g)
            return
        bucket[id(p)] = (p, g)
        self._pending_bytes[key] = self._pending_bytes.get(key, 0) + g.numel() * g.element_size()
        if self._pending_bytes[key] >= self.bucket_bytes:
            self._flush_bucket(key)

    @torch.no_grad()
    def flush(self) -> None:
        """Fold every queued gradient now (runs by itself at the end of each backward)."""
        self._flush_queued = False
        for key in list(self._pending):
            self._flush_bucket(key)

    def _flush_bucket(self, key) -> None:
        entries = list(self._pending.pop(key).values())
        self._pending_bytes.pop(key, None)
        if entries:
            self._fold_many(self.param_groups[key[0]], [p for p, _ in entries], [g for _, g in entries])

    @torch.no_grad()
    def fold(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Fold one micro-batch gradient contribution ``grad`` (= g_i / N) of ``p`` into its states now."""
        self._fold_many(self.param_groups[self._group_id(p)], [p], [grad])

    def _fold_many(self, group: dict, params: list, grads: list) -> None:
        with torch.profiler.record_function("adama.fold"):  # named in profiles (benchmarks/adama_speed.py)
            self._fold_many_impl(group, params, grads)

    def _fold_many_impl(self, group: dict, params: list, grads: list) -> None:
        b1, b2 = group["betas"]
        n = self._n
        states = [self._init_state(p) for p in params]
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        scales = None
        if self.per_param_clip is not None or self.track_grad_norm:
            # micro-batch mean-gradient norms, one multi-tensor op; kept on the device (no host sync)
            norms = torch.stack(torch._foreach_norm(grads, dtype=torch.float32)) * n
            if self.track_grad_norm:
                sq = norms.pow(2).sum()
                if self._sq_norm is None:
                    self._sq_norm = sq
                else:
                    self._sq_norm = self._sq_norm + sq.to(self._sq_norm.device)
            if self.per_param_clip is not None:
                scales = (self.per_param_clip / (norms + 1e-6)).clamp_(max=1.0)
        dense = [i for i, st in enumerate(states) if not isinstance(st["exp_avg"], lowbit.Q8State)]
        if dense:
            fold, _, triton = _backend(self.impl, grads[dense[0]].device)
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i in dense:
                by_dtype.setdefault(states[i]["exp_avg"].dtype, []).append(i)
            for idx in by_dtype.values():
                sub = [scales[i] for i in idx] if scales is not None else None
                ms = [states[i]["exp_avg"] for i in idx]
                vs = [states[i]["exp_avg_sq"] for i in idx]
                firsts = [states[i]["folds"] == 0 for i in idx]
                gs = [grads[i] for i in idx]
                if triton:
                    gscale = torch.stack(sub) if sub is not None else None
                    seed = self._next_seed() if self.stochastic_rounding else None
                    fold(gs, ms, vs, firsts, gscale, beta1=b1, beta2=b2, n=n, seed=seed)
                else:
                    gen = self._generator(gs[0].device)
                    fold(gs, ms, vs, firsts, sub if sub is not None else [1.0] * len(gs), beta1=b1, beta2=b2, n=n,
                         generator=gen)
        q8 = [i for i, st in enumerate(states) if isinstance(st["exp_avg"], lowbit.Q8State)]
        if q8 and self._q8_kernels(grads[q8[0]].device):
            from hf_efficient.kernels import adama_q8

            dev = grads[q8[0]].device
            by_dtype = {}
            for i in q8:
                by_dtype.setdefault(grads[i].dtype, []).append(i)
            for idx in by_dtype.values():
                adama_q8.fold_q8_triton(
                    [grads[i] for i in idx], [states[i]["exp_avg"] for i in idx],
                    [states[i]["exp_avg_sq"] for i in idx],
                    [states[i]["folds"] == 0 for i in idx],
                    torch.stack([scales[i] for i in idx]) if scales is not None else None, beta1=b1, beta2=b2, n=n,
                    mgrid=lowbit.value_map(True, dev), vgrid=lowbit.value_map(False, dev),
                    seed=self._next_seed() if self.stochastic_rounding else None)
        else:
            for i in q8:
                g = grads[i].float() if scales is None else grads[i].float() * scales[i]
                self._fold_q8(states[i], g, b1, b2, n)
        for st in states:
            st["folds"] += 1

    def _q8_kernels(self, device: torch.device) -> bool:
        """Whether 8-bit states go through the Triton kernels (:mod:`hf_efficient.kernels.adama_q8`)."""
        if self.impl in ("foreach", "per_tensor") or self.block_size & (self.block_size - 1):
            return False
        if self.impl == "triton":
            return True
        from hf_efficient.kernels import HAS_TRITON

        return device.type == "cuda" and HAS_TRITON

    def _fold_q8(self, st: dict, g: torch.Tensor, b1: float, b2: float, n: int) -> None:
        m, v = st["exp_avg"], st["exp_avg_sq"]
        first = st["folds"] == 0
        gen = self._generator(g.device)
        gf = g.reshape(-1)
        for a, b in m.chunks():  # chunked: the fp32 temporaries stay small for huge tensors
            m32, v32 = m.dequantize(a, b), v.dequantize(a, b)
            if first:
                m32.mul_(b1)
                v32.mul_(b2)
            m32.add_(gf[a:b], alpha=1.0 - b1)
            v32.addcmul_(gf[a:b], gf[a:b], value=(1.0 - b2) * n)
            m.store(m32, gen, a)
            v.store(v32, gen, a)

    def _next_seed(self) -> int:
        self._launches += 1
        return (self.seed * 1_000_003 + self._launches) & 0x7FFFFFFF

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if not self.stochastic_rounding:
            return None
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    @torch.no_grad()
    def fold_grads(self) -> None:
        """Fold every present ``p.grad`` as one micro-batch and free it (for ``fold_on_hook=False``)."""
        self.flush()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("AdamA does not support sparse gradients; use dense gradients")
                    g, p.grad = p.grad, None
                    self._enqueue(p, g)
        self.flush()
        self._micro_batches += 1

    def pop_grad_norm(self, micro_batches: int | None = None) -> float | None:
        """RMS over the step's micro-batches of the micro-batch mean-gradient norm (== global grad norm
        when N = 1; >= the accumulated gradient's norm otherwise), then reset. None when not tracked."""
        if self._sq_norm is None:
            return None
        k = micro_batches or self._n
        val = math.sqrt(float(self._sq_norm) / k)
        self._sq_norm = None
        return val

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Apply the update to every parameter that received at least one micro-batch since the last
        step. Gradients still present in ``p.grad`` (no hook ran) are folded first, as one more
        micro-batch, and freed."""
        if not self._hooks and self._n > 1 and self._micro_batches == 0 and self.process_group is None:
            raise RuntimeError(f"AdamA(fold_on_hook=False, accumulation_steps={self._n}): call fold_grads() after "
                               "each micro-batch's backward (AdamACallback does it under Trainer); otherwise the "
                               "micro-batches would be summed before folding")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.flush()
        present = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if present:
            for p in present:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamA does not support sparse gradients; use dense gradients")
                g, p.grad = p.grad, None
                self._enqueue(p, g)
            self.flush()
        with torch.profiler.record_function("adama.update"):
            self._update_all()
        self._micro_batches = 0
        return loss

    def _update_all(self) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            launches: dict[tuple, list] = {}
            q8_launches: dict[tuple, list] = {}
            for p in group["params"]:
                st = self.state.get(p)
                if not st or st["folds"] == 0:
                    continue  # no gradient this step: like AdamW with grad None, the parameter is untouched
                st["folds"] = 0
                st["step"] += 1
                t = st["step"].item()
                m, v = st["exp_avg"], st["exp_avg_sq"]
                if isinstance(m, lowbit.Q8State):
                    if self._q8_kernels(p.device) and p.is_contiguous():
                        q8_launches.setdefault((p.device, p.dtype), []).append(
                            (p, m, v, lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t), 1.0 - lr * wd))
                    else:
                        self._update_q8(p, m, v, lr=lr, wd=wd, eps=eps, c1=1.0 - b1 ** t, c2=1.0 - b2 ** t,
                                        b1=b1, b2=b2)
                    continue
                launches.setdefault((p.device, p.dtype, m.dtype), []).append(
                    (p, m, v, lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t), 1.0 - lr * wd))
            for (dev, _), rows in q8_launches.items():
                from hf_efficient.kernels import adama_q8

                ps, ms, vs, a, c, d = map(list, zip(*rows))
                adama_q8.update_q8_triton(ps, ms, vs, step_sizes=a, sqrt_c2s=c, decays=d, eps=eps,
                                          bound=_ratio_bound(b1, b2), mgrid=lowbit.value_map(True, dev),
                                          vgrid=lowbit.value_map(False, dev))
            for (dev, _, _), rows in launches.items():
                _, update, _ = _backend(self.impl, dev)
                ps, ms, vs, a, c, d = map(list, zip(*rows))
                contiguous = all(x.is_contiguous() for x in ps)
                if not contiguous:  # kernels address parameters as flat memory
                    _, update, _ = _backend("per_tensor", dev)
                update(ps, ms, vs, step_sizes=a, sqrt_c2s=c, decays=d, eps=eps)

    @staticmethod
    def _update_q8(p, m, v, *, lr, wd, eps, c1, c2, b1, b2) -> None:
        flat = p.view(-1)
        bound = _ratio_bound(b1, b2)
        for a, b in m.chunks():
            mq, vq = m.dequantize(a, b), v.dequantize(a, b)
            if bound is not None:  # quantization can break |m| <= C sqrt(v); a zeroed v would explode
                lim = vq.sqrt().mul_(bound)
                mq = torch.maximum(torch.minimum(mq, lim), -lim)
            _update(flat[a:b], mq, vq, lr=lr, wd=wd, eps=eps, c1=c1, c2=c2)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Like ``Optimizer.state_dict``; 8-bit states are saved as plain tensors (codes, scale)."""
        sd = super().state_dict()
        state = {}
        for k, st in sd["state"].items():
            st = dict(st)
            for name in ("exp_avg", "exp_avg_sq"):
                if isinstance(st.get(name), lowbit.Q8State):
                    st[name] = st[name].to_saved()
            state[k] = st
        sd["state"] = state
        sd["adama"] = {"format_version": 1, "accumulation_steps": self._n, "state_bits": self.state_bits,
                       "rng": {str(d): g.get_state() for d, g in self._generators.items()},
                       "launches": self._launches}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore exactly: fp32 states keep fp32 even for bf16/fp16 parameters (torch's default
        loader would cast them to the parameter dtype)."""
        meta = state_dict.get("adama")
        if meta is None or meta.get("format_version") != 1:
            raise ValueError(f"AdamA.load_state_dict: not an AdamA v1 state dict (adama={meta!r})")
        saved = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            st = {}
            for name, val in saved[i].items():
                if name in ("exp_avg", "exp_avg_sq"):
                    st[name] = (lowbit.Q8State.from_saved(val, p.device) if isinstance(val, dict)
                                else val.to(p.device).clone())
                elif name == "step":
                    st[name] = val.detach().clone().float().cpu()
                else:
                    st[name] = val
            self.state[p] = st
        if hasattr(self, "_group_index"):
            del self._group_index
        self._generators = {}
        self._launches = int(meta.get("launches", 0))
        for dev, rng in meta.get("rng", {}).items():
            self._generator(torch.device(dev)).set_state(rng)

    def state_bytes(self) -> int:
        """Bytes held by m and v (codes + scales for 8-bit states)."""
        total = 0
        for st in self.state.values():
            for name in ("exp_avg", "exp_avg_sq"):
                t = st.get(name)
                if t is None:
                    continue
                total += t.nbytes() if isinstance(t, lowbit.Q8State) else t.numel() * t.element_size()
        return total


def _ratio_bound(b1: float, b2: float) -> float | None:
    """C with |m| <= C sqrt(v) for exact Adam/AdamA states (Cauchy-Schwarz over the decayed sums;
    AdamA's v is only larger); None when b1**2 >= b2 (no finite bound)."""
    if b1 * b1 >= b2:
        return None
    return (1.0 - b1) / math.sqrt((1.0 - b2) * (1.0 - b1 * b1 / b2))


def _update(p, m, v, *, lr, wd, eps, c1, c2) -> None:
    """p <- p (1 - lr wd) - lr (m / c1) / (sqrt(v / c2) + eps), computed in fp32 whatever p's dtype."""
    denom = (v.sqrt() / math.sqrt(c2)).add_(eps)
    target = p if p.dtype == torch.float32 else p.float()
    target.mul_(1.0 - lr * wd)
    target.addcdiv_(m, denom, value=-lr / c1)
    if target is not p:
        p.copy_(target)


def _ddp_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
