"""The device-side expert cache: a fixed pool of expert slots, split evenly between MoE layers, LRU within a layer.

Copies go through a *copier* so the same cache logic runs on every device:

* :class:`CudaCopier` — host-to-device copies on a side stream from page-locked memory; one ``ready`` event per
  slot (compute waits on it before reading) and one ``free`` event per slot (the copy stream waits on it before
  overwriting a slot compute may still be reading).
* :class:`SyncCopier` — plain synchronous copies (CPU, or any device when asynchrony is not wanted).
* :class:`SimulatedAsyncCopier` — CPU stand-in for a copy stream that makes protocol errors visible: a copy only
  lands when compute waits for its slot (so reading without waiting reads stale data), and a copy that would land
  in a slot compute is still reading raises.
"""
from __future__ import annotations

from collections import OrderedDict, deque

import torch


class SyncCopier:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots

    def copy(self, slot: int, dst: tuple[torch.Tensor, ...], src: tuple[torch.Tensor, ...]) -> None:
        for d, s in zip(dst, src):
            d.copy_(s)

    def wait(self, slot: int) -> None:
        pass

    def end_use(self, slots) -> None:
        pass

    def synchronize(self) -> None:
        pass


class SimulatedAsyncCopier(SyncCopier):
    """FIFO queue of copies that land only when compute waits for a slot (or on :meth:`synchronize`)."""

    def __init__(self, num_slots: int):
        super().__init__(num_slots)
        self.queue: deque = deque()
        self.in_use: set[int] = set()
        self.landed = 0

    def copy(self, slot, dst, src):
        # The host copy of an expert never changes while offloaded, so reading it when the copy lands is safe.
        self.queue.append((slot, dst, src))

    def _land_one(self):
        slot, dst, src = self.queue.popleft()
        if slot in self.in_use:
            raise RuntimeError(f"copy into expert slot {slot} landed while compute was reading it")
        for d, s in zip(dst, src):
            d.copy_(s)
        self.landed += 1

    def wait(self, slot):
        # A stream is FIFO: waiting for one slot's copy lands every copy queued before it too.
        last = max((i for i, (s, _, _) in enumerate(self.queue) if s == slot), default=-1)
        for _ in range(last + 1):
            self._land_one()
        self.in_use.add(slot)  # compute reads it from now until end_use

    def end_use(self, slots):
        self.in_use.difference_update(slots)

    def synchronize(self):
        while self.queue:
            self._land_one()


class CudaCopier(SyncCopier):
    def __init__(self, num_slots: int, device: torch.device):
        super().__init__(num_slots)
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.ready = [torch.cuda.Event() for _ in range(num_slots)]
        self.free = [None] * num_slots  # event recorded on the compute stream after the slot's last read

    def copy(self, slot, dst, src):
        with torch.cuda.stream(self.stream):
            if self.free[slot] is not None:
                self.stream.wait_event(self.free[slot])
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
            self.ready[slot].record(self.stream)

    def wait(self, slot):
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def end_use(self, slots):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        for s in slots:
            self.free[s] = ev

    def synchronize(self):
        self.stream.synchronize()


def make_copier(kind: str, num_slots: int, device: torch.device):
    if kind == "auto":
        kind = "cuda" if device.type == "cuda" else "sync"
    if kind == "cuda":
        if device.type != "cuda":
            raise ValueError(f"copier='cuda' needs a CUDA device, got device={device}")
        return CudaCopier(num_slots, device)
    if kind == "sync":
        return SyncCopier(num_slots)
    if kind == "simulated":
        return SimulatedAsyncCopier(num_slots)
    raise ValueError(f"copier={kind!r} is invalid; allowed: 'auto', 'cuda', 'sync', 'simulated'")


class ExpertCache:
    """``slots_per_layer`` device slots per MoE layer holding copies of that layer's experts, LRU within a layer.

    ``host[l] = (gate_up_proj, down_proj)`` of MoE layer ``l`` (host tensors, shapes (E, 2I, H), (E, H, I)).
    A slot is *pinned* from :meth:`acquire` until :meth:`release` and is never evicted meanwhile.
    """

    def __init__(self, host: list[tuple[torch.Tensor, torch.Tensor]], slots_per_layer: int, device: torch.device,
                 copier: SyncCopier, fill: float | None = None):
        self.host = host
        self.slots_per_layer = slots_per_layer
        self.device = device
        self.copier = copier
        gu, dn = host[0]
        n = len(host) * slots_per_layer
        alloc = torch.full if fill is not None else torch.empty
        args = (fill,) if fill is not None else ()
        self.pool = (alloc((n, *gu.shape[1:]), *args, dtype=gu.dtype, device=device),
                     alloc((n, *dn.shape[1:]), *args, dtype=dn.dtype, device=device))
        self.expert_bytes = sum(t[0].numel() * t.element_size() for t in host[0])
        self.resident: list[OrderedDict[int, int]] = [OrderedDict() for _ in host]
        self.free: list[list[int]] = [list(range(l * slots_per_layer, (l + 1) * slots_per_layer))[::-1]
                                      for l in range(len(host))]
        self.pinned: set[int] = set()

    def slot_tensors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[0][slot], self.pool[1][slot]

    def _load(self, layer: int, expert: int) -> int:
        res = self.resident[layer]
        if self.free[layer]:
            slot = self.free[layer].pop()
        else:
            victim = next((e for e, s in res.items() if s not in self.pinned), None)
            if victim is None:
                raise RuntimeError(f"MoE layer {layer}: all {self.slots_per_layer} expert slots are pinned")
            slot = res.pop(victim)
        gu, dn = self.host[layer]
        self.copier.copy(slot, self.slot_tensors(slot), (gu[expert], dn[expert]))
        res[expert] = slot
        return slot

    def acquire(self, layer: int, experts: list[int]) -> tuple[list[int], list[int]]:
        """Pin ``experts`` of ``layer`` (at most ``slots_per_layer``), copying the missing ones in order.

        Returns (slots, missed experts)."""
        if len(experts) > self.slots_per_layer:
            raise ValueError(f"acquire: {len(experts)} experts > {self.slots_per_layer} slots of layer {layer}")
        res, slots, missed = self.resident[layer], [], []
        for e in experts:  # hits first, so a miss cannot evict an expert this call needs
            if e in res:
                res.move_to_end(e)
                self.pinned.add(res[e])
        for e in experts:
            if e not in res:
                missed.append(e)
                self.pinned.add(self._load(layer, e))
            slots.append(res[e])
        return slots, missed

    def release(self, slots: list[int]) -> None:
        self.copier.end_use(slots)
        self.pinned.difference_update(slots)

    def prefetch(self, layer: int, experts: list[int]) -> list[int]:
        """Copy those of ``experts`` not resident, in order, as far as unpinned slots allow; returns the copied ones."""
        res, copied = self.resident[layer], []
        room = self.slots_per_layer - sum(1 for s in res.values() if s in self.pinned)
        for e in experts[:room]:
            if e in res:
                res.move_to_end(e)
            else:
                self._load(layer, e)
                copied.append(e)
        return copied

    def drop(self, layer: int) -> None:
        """Forget every unpinned expert of ``layer`` (their slots are reused by later copies)."""
        res = self.resident[layer]
        for e in [e for e, s in res.items() if s not in self.pinned]:
            self.free[layer].append(res.pop(e))
