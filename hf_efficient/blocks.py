"""Row blocks that bound the temporaries of whole-tensor work.

Packing, unpacking and quantizing widen a code or weight to int64/float32 for a moment; done on a whole
7B-sized matrix at once those temporaries are several times the packed tensor (on a GPU they set the peak
memory of loading a model). Working a block of rows at a time keeps them near ``BLOCK_ELEMENTS``.
"""
from __future__ import annotations

from collections.abc import Iterator

BLOCK_ELEMENTS = 2 ** 20


def row_blocks(rows: int, row_elements: int, block_elements: int | None = None) -> Iterator[slice]:
    """Slices of ``range(rows)`` of about ``block_elements`` (default :data:`BLOCK_ELEMENTS`) elements each, at
    least one row per slice."""
    step = max(1, (block_elements or BLOCK_ELEMENTS) // max(row_elements, 1))
    for r in range(0, rows, step):
        yield slice(r, min(r + step, rows))
