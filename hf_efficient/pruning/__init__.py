"""L0 structured pruning of Conformer ASR (ParakeetForCTC) with layerwise distillation."""
from .config import L0PruningConfig
from .distill import LayerwiseDistiller
from .hard_concrete import HardConcreteGate
from .parakeet import (ParakeetL0Pruner, PrunedParakeetForCTC, count_params, layout_from_model, magnitude_masks,
                       prune_parakeet, unit_counts)
from .trainer import PruningTrainer

__all__ = ["L0PruningConfig", "HardConcreteGate", "LayerwiseDistiller", "ParakeetL0Pruner", "PrunedParakeetForCTC",
           "PruningTrainer", "count_params", "layout_from_model", "magnitude_masks", "prune_parakeet", "unit_counts"]
