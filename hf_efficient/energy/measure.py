"""Energy measurement: a cumulative energy counter sampled at its tick edges.

NVML's total-energy counter (millijoules since driver load) advances in steps, about every 100 ms on
Hopper: read at arbitrary times it is off by up to one step, so a 1 s window would carry ~10 % error. We
instead watch the counter from a background thread and keep the host time of every *change* (a tick
edge). Between two edges the energy and the time are both exact up to the polling interval, so the
average power over a run of edges is accurate, and its spread over the single ticks gives a noise
estimate. A kernel's energy per call is then (average power while the GPU is busy with nothing else)
x (GPU time per call from CUDA events). This needs the GPU busy for the whole window: :func:`measure_op`
keeps a queue of CUDA-graph replays in flight.

Counters are pluggable (:class:`EnergyCounter`); :class:`NVMLCounter` is the real one, and tests use a
simulated counter with a known power (a test double at the hardware boundary only).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Protocol


class EnergyUnavailableError(RuntimeError):
    """No energy counter: NVML bindings missing, no NVIDIA driver, or the GPU lacks the counter."""


class EnergyCounter(Protocol):
    def read_mj(self) -> float:
        """Cumulative energy in millijoules (monotone; only differences matter)."""

    def name(self) -> str:
        """The device's name, e.g. ``NVIDIA H200`` (keys tuned tables)."""


class NVMLCounter:
    """The GPU's total-energy counter through NVML (``pip install hf-efficient[energy]`` brings the
    ``nvidia-ml-py`` bindings). ``index`` is NVML's device index (``CUDA_VISIBLE_DEVICES`` is not applied:
    pass the physical index). Raises :class:`EnergyUnavailableError` with the reason when unusable."""

    def __init__(self, index: int = 0):
        try:
            import pynvml
        except ImportError as e:
            raise EnergyUnavailableError("energy measurement needs NVML bindings: pip install "
                                         "'hf-efficient[energy]' (the nvidia-ml-py package)") from e
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if not 0 <= index < count:
                raise EnergyUnavailableError(f"index must be in [0, {count}), got {index}")
            self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._h)
        except pynvml.NVMLError as e:
            raise EnergyUnavailableError(f"NVML energy counter unavailable on device {index}: {e}") from e

    def read_mj(self) -> float:
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h))

    def name(self) -> str:
        n = self._nvml.nvmlDeviceGetName(self._h)
        return n.decode() if isinstance(n, bytes) else str(n)


@dataclass
class EnergyReading:
    """One measured window. ``joules``/``seconds`` span whole counter ticks inside the window."""

    joules: float
    seconds: float
    watts: float
    ticks: int
    noise_rel: float  # standard error of the mean power, relative (from the spread of single ticks)

    def as_dict(self) -> dict:
        return asdict(self)


class EdgeSampler:
    """Polls ``counter`` on a daemon thread and records ``(host_time, mJ)`` at each change of value."""

    def __init__(self, counter: EnergyCounter, poll_s: float = 2e-4, clock: Callable[[], float] = time.perf_counter):
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.counter, self.poll_s, self.clock = counter, poll_s, clock
        self.edges: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        last = self.counter.read_mj()
        while not self._stop.is_set():
            v = self.counter.read_mj()
            if v != last:
                self.edges.append((self.clock(), v))
                last = v
            time.sleep(self.poll_s)

    def __enter__(self) -> "EdgeSampler":
        self._thread = threading.Thread(target=self._run, daemon=True, name="energy-edges")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def power_between(edges: list[tuple[float, float]], t_lo: float, t_hi: float) -> EnergyReading:
    """Average power over the tick edges that fall inside ``[t_lo, t_hi]``.

    Needs at least three edges in the window (two whole ticks) for a noise estimate; raises ValueError
    naming the window otherwise, since a shorter window cannot be trusted."""
    inside = [(t, e) for t, e in edges if t_lo <= t <= t_hi]
    if len(inside) < 3:
        raise ValueError(f"window [{t_lo:.3f}, {t_hi:.3f}] s holds {len(inside)} counter edges; need >= 3: "
                         f"lengthen window_s (the NVML counter ticks about every 100 ms; use >= 2 s)")
    (t0, e0), (t1, e1) = inside[0], inside[-1]
    joules, seconds = (e1 - e0) / 1e3, t1 - t0
    watts = joules / seconds
    ticks = [((b[1] - a[1]) / 1e3) / (b[0] - a[0]) for a, b in zip(inside, inside[1:]) if b[0] > a[0]]
    n = len(ticks)
    mean = sum(ticks) / n
    sd = math.sqrt(sum((p - mean) ** 2 for p in ticks) / (n - 1)) if n > 1 else float("inf")
    # per-tick jitter of the edge times telescopes over the window, so sd/sqrt(n) is conservative
    return EnergyReading(joules, seconds, watts, n, sd / math.sqrt(n) / watts if watts else float("inf"))


class EnergyMeter:
    """Context manager measuring the energy of any workload between tick edges.

    >>> with EnergyMeter() as meter:          # doctest: +SKIP
    ...     run_my_workload()                  # keep it >= 2 s; synchronize the GPU before leaving
    >>> meter.reading.joules, meter.reading.watts

    The reading covers the whole ticks inside the block (the partial ticks at both ends are dropped),
    so ``reading.watts`` is the block's average power and ``reading.watts * block_seconds`` its energy;
    ``meter.seconds`` is the block's wall time. ``synchronize`` (default: CUDA if initialized) is called
    before the exit time is taken, so queued kernels count."""

    def __init__(self, counter: EnergyCounter | None = None, synchronize: Callable[[], None] | None = None,
                 poll_s: float = 2e-4, clock: Callable[[], float] = time.perf_counter):
        self.counter = counter if counter is not None else NVMLCounter()
        self.synchronize = synchronize if synchronize is not None else _cuda_sync
        self.poll_s, self.clock = poll_s, clock
        self.reading: EnergyReading | None = None
        self.seconds = 0.0

    def __enter__(self) -> "EnergyMeter":
        self._sampler = EdgeSampler(self.counter, self.poll_s, self.clock).__enter__()
        self._t0 = self.clock()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.synchronize()
        t1 = self.clock()
        self._sampler.__exit__()
        self.seconds = t1 - self._t0
        if exc_type is None:
            self.reading = power_between(self._sampler.edges, self._t0, t1)

    @property
    def joules(self) -> float:
        """Energy of the whole block: average power over its whole ticks x its wall time."""
        if self.reading is None:
            raise RuntimeError("no reading: the block raised or has not finished")
        return self.reading.watts * self.seconds


def _cuda_sync() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except ImportError:
        pass


@dataclass
class OpEnergy:
    """Energy and latency of one op (a callable) measured by :func:`measure_op`."""

    joules_per_op: float
    latency_s: float
    watts: float
    noise_rel: float
    ops: int
    ticks: int
    window_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def measure_op(fn: Callable[[], object], counter: EnergyCounter | None = None, window_s: float = 2.0,
               warmup_s: float = 0.25, replay_s: float = 0.01, use_graph: bool = True) -> OpEnergy:
    """Joules per call of ``fn`` (a CUDA workload) at steady state, with its latency.

    ``fn`` is captured ``k`` times into a CUDA graph (``k`` chosen so one replay lasts ~``replay_s``);
    replays run back to back for ``warmup_s + window_s`` with a few always queued, so the GPU never idles;
    power comes from the counter edges after the warm-up, latency from CUDA events over all replays.
    ``use_graph=False`` (or a capture failure) launches ``fn`` directly instead."""
    import torch

    if window_s <= 0 or warmup_s < 0 or replay_s <= 0:
        raise ValueError(f"window_s and replay_s must be > 0 and warmup_s >= 0, got {window_s}, {replay_s}, "
                         f"{warmup_s}")
    if not torch.cuda.is_available():
        raise EnergyUnavailableError("measure_op needs a CUDA device")
    counter = counter if counter is not None else NVMLCounter()
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    per_call = max((time.perf_counter() - t) / 5, 1e-6)
    k = max(1, min(4096, int(replay_s / per_call)))
    replay = _graph_of(fn, k) if use_graph else None
    if replay is None:
        def replay():
            for _ in range(k):
                fn()
    depth = 4
    ring = [torch.cuda.Event() for _ in range(depth)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with EdgeSampler(counter) as sampler:
        t0 = time.perf_counter()
        start.record()
        n, t_stop = 0, t0 + warmup_s + window_s
        while True:
            ring[n % depth].synchronize()  # at most `depth` replays queued: host stays near the GPU's time
            now = time.perf_counter()
            if now >= t_stop:
                break
            replay()
            ring[n % depth].record()
            n += 1
        t_last_launch = now
        end.record()
        end.synchronize()
    reading = power_between(sampler.edges, t0 + warmup_s, t_last_launch)
    latency = start.elapsed_time(end) / 1e3 / (n * k)
    return OpEnergy(reading.watts * latency, latency, reading.watts, reading.noise_rel, n * k, reading.ticks,
                    reading.seconds)


def _graph_of(fn: Callable[[], object], k: int):
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(k):
                fn()
        torch.cuda.synchronize()
        return graph.replay
    except Exception:  # not capturable (host syncs, allocations): plain launches measure the same thing
        return None
