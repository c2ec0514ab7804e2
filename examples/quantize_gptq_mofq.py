"""GPTQ and MoFQ over every 4-bit format on the embedded model, scored on held-out plays and on news text.

Run: python examples/quantize_gptq_mofq.py   (CPU; a few minutes on two cores)
"""
import time

import hf_efficient  # noqa: F401  (registers afpq / mofq with transformers)
from hf_efficient import AFPQConfig, MoFQConfig
from hf_efficient.data import heldout_ids
from hf_efficient.evaluation import perplexity
from hf_efficient.models import load_default
from hf_efficient.quantization.api import calibration_windows, quantize_model

model, tok = load_default()
held = {name: heldout_ids(tok, name, 1024) for name in ("plays", "news")}
# Half training plays, half text the model writes itself from short prompts (generated once, then cached).
windows = calibration_windows(tok, 16, 256, source="mixed", model=model)

for cfg in (AFPQConfig(bits=4, fmt="nf", group_size=128, algorithm="gptq"),   # AFPQ NF4-asym, block GPTQ
            MoFQConfig(bits=4, group_size=128)):                              # per-layer choice among 6 formats
    m, _ = load_default()
    t = time.perf_counter()
    quantize_model(m, cfg, windows)
    secs = time.perf_counter() - t
    ppl = {k: round(perplexity(m, v, context=1024, progress=False), 2) for k, v in held.items()}
    print(f"{type(cfg).__name__} {cfg.algorithm}: {secs:.0f} s, PPL {ppl} {cfg.summary()}")
    del m
