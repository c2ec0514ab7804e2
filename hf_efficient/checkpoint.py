"""Integrity checks for saved checkpoints: a truncated or corrupt safetensors file, non-finite scales.

Both fail in one line that names the file or the tensor, instead of a raw ``SafetensorError`` or a
model that loads and silently computes NaN.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be used; the message names it and says why."""


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` if ``path`` is not a complete safetensors file.

    Reads only the header: an 8-byte little-endian length, a JSON table of tensors with byte offsets into
    the data section, and the file size must hold the largest end offset. Cheap on any size of file.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{p} is truncated or not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{p} is truncated or corrupt: its header claims {n} bytes, the file holds "
                                      f"{size - 8} after the length field")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{p} is corrupt: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p} is corrupt: its header is not a table of tensors")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise CheckpointError(f"{p} is truncated: {size} bytes, its header needs {need} (an interrupted download "
                              f"or copy?)")


def check_model_dir(path: str | os.PathLike) -> None:
    """:func:`check_safetensors_file` on every ``*.safetensors`` file of a model directory."""
    for f in sorted(Path(path).glob("*.safetensors")):
        check_safetensors_file(f)


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` naming the first floating-point tensor holding NaN or inf.

    One reduction per tensor; integer tensors (packed codes, zero points) are skipped."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{name} holds {bad} non-finite value(s) (NaN/inf): the checkpoint is corrupt")
