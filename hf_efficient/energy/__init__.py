"""Energy-aware kernel autotuning: measured joules, a cost model updated online, choice among variants.

- :mod:`.measure`: NVML energy between counter tick edges (:class:`EnergyMeter` around any workload,
  :func:`measure_op` for one op at steady state under CUDA-graph replays).
- :mod:`.variants`: the registry of ops and their candidate implementations/configs.
- :mod:`.costmodel`: features -> predicted energy and latency (roofline prior x gradient-boosted trees).
- :mod:`.search`: the selection rule (least energy within ``(1 + eps)`` of the fastest, latency choice when
  the saving is inside the noise), exhaustive and cost-model-guided search.
- :mod:`.autotune`: the same rule inside ``triton.autotune`` (``prune_configs_by`` + ``do_bench``).
- :mod:`.tables`: shipped tuned choices per GPU name and the ``tune="energy"`` dispatcher :func:`linear`.

Nothing here changes power limits, clocks or any other GPU setting: the knobs are kernels and configs.
"""
from __future__ import annotations

from .config import TUNE_ENV, EnergyTuneConfig, tune_mode
from .costmodel import CostModel, kernel_features
from .measure import EnergyMeter, EnergyUnavailableError, NVMLCounter, measure_op
from .search import Measurement, choose, exhaustive_search, model_search
from .tables import linear
from .variants import Candidate, OpSpec, get_op, register_op

__all__ = ["EnergyTuneConfig", "TUNE_ENV", "tune_mode", "CostModel", "kernel_features", "EnergyMeter",
           "EnergyUnavailableError", "NVMLCounter", "measure_op", "Measurement", "choose", "exhaustive_search",
           "model_search", "linear", "Candidate", "OpSpec", "get_op", "register_op"]
