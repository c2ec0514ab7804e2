"""The model card (README.md) written beside every quantized checkpoint.

It states what the checkpoint is (method, formats, bits, group size, algorithm, what stayed in float), a
measured perplexity when one is known, and how to load it: ``pip install hf-efficient`` and ``import
hf_efficient`` first, without which transformers refuses the checkpoint (format_version 2's load guards).
A README.md that hf-efficient did not write is never overwritten.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

MARKER = "<!-- written by hf-efficient; edit freely (it is rewritten only while this line stays) -->"


def _formats(config) -> str:
    chosen = getattr(config, "layer_formats", None)
    if chosen:
        return ", ".join(f"{f} ({n} layers)" for f, n in sorted(Counter(chosen.values()).items()))
    spec = config.layer_spec("") if hasattr(config, "layer_spec") else None
    return spec.fmt if spec is not None else "?"


def model_card(config, name: str = "model", metrics: dict | None = None) -> str:
    """Markdown model card for a checkpoint quantized with ``config`` (a QuantConfigBase).

    ``metrics``: optional ``{"perplexity": float, "perplexity_on": str}`` measured on the quantized model."""
    group = "per output channel" if config.group_size == -1 else str(config.group_size)
    algo = config.algorithm
    if algo == "gptq":
        algo += f" ({config.calib_samples} calibration windows x {config.calib_seqlen} tokens" \
                + (", act-order" if config.act_order else "") + ")"
    else:
        algo += " (round-to-nearest)"
    act_bits = getattr(config, "act_bits", None)
    rows = [("quant_method", config.quant_method), ("weight format(s)", _formats(config)),
            ("bits", config.bits), ("group size", group), ("scale dtype", config.scale_dtype),
            ("algorithm", algo),
            ("activations", f"{act_bits}-bit per token (W{config.bits}A{act_bits})" if act_bits else "float"),
            ("kept in float", ", ".join(config.modules_to_not_convert) or "none"),
            ("format_version", config.format_version)]
    if metrics and metrics.get("perplexity") is not None:
        rows.append(("perplexity", f"{metrics['perplexity']:.3f} ({metrics.get('perplexity_on', 'measured')})"))
    else:
        rows.append(("perplexity", "not measured (hf-efficient eval --model <this folder>)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: transformers
tags: [hf-efficient, quantized, {config.quant_method}]
---
{MARKER}

# {name}: {config.quant_method} {_formats(config)}, quantized with hf-efficient

| | |
|---|---|
{table}

## Load it

```bash
pip install hf-efficient
```

```python
import hf_efficient  # registers the "{config.quant_method}" method with transformers: required
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

Without `import hf_efficient`, transformers does not know `quant_method="{config.quant_method}"` and refuses
this checkpoint with a size-mismatch error on each quantized layer's `weight` (a 1-element guard stored for
exactly that purpose; the packed weights are `qweight` and the scales beside it).
"""


def write_model_card(out_dir: str | os.PathLike, config, metrics: dict | None = None) -> Path | None:
    """Write README.md in ``out_dir`` unless a README.md not written by hf-efficient is there. Returns its path."""
    path = Path(out_dir) / "README.md"
    if path.exists() and MARKER not in path.read_text(errors="replace"):
        return None
    path.write_text(model_card(config, Path(out_dir).resolve().name, metrics))
    return path


def install_card_writer(model) -> None:
    """Make ``model.save_pretrained(dir)`` also write the model card (metrics from ``model.hf_efficient_metrics``)."""
    if getattr(model, "_hf_efficient_card_writer", False):
        return
    save = model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        out = save(save_directory, *args, **kwargs)
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        if config is not None and hasattr(config, "layer_spec") and kwargs.get("is_main_process", True):
            write_model_card(save_directory, config, getattr(model, "hf_efficient_metrics", None))
        return out

    save_pretrained.__doc__ = save.__doc__
    model.save_pretrained = save_pretrained
    model._hf_efficient_card_writer = True
