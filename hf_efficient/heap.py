"""glibc heap control: give freed memory back to the OS (no-ops where the C library is not glibc), and
:func:`glibc_function`, the lookup of a C library function that other modules (the decode step's madvise) share.

Quantizing allocates temporaries several times a layer's size and frees them. glibc then raises its mmap
threshold and serves such blocks from the heap, where freed space stays in the process and is measured as
the model's memory (docs/lut.md, "The main job's rows").
"""
from __future__ import annotations

import ctypes
import sys

_LIBC: dict[str, object] = {}


def glibc_function(name: str):
    """The glibc function ``name``, or None (not Linux, or a C library without it, e.g. musl)."""
    if name not in _LIBC:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = getattr(ctypes.CDLL(None), name)
            except (OSError, AttributeError):
                fn = None
        _LIBC[name] = fn
    return _LIBC[name]


def release_free_heap() -> None:
    """Give the heap memory freed so far back to the OS (``malloc_trim``); costs microseconds."""
    trim = glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def fix_mmap_threshold(nbytes: int) -> None:
    """Serve blocks of ``nbytes`` and more from their own mappings, so freeing one returns it to the OS.

    A fixed threshold turns glibc's dynamic adjustment off. A process-wide setting: only the demo's own worker
    process calls it; the library never changes allocator settings.
    """
    mallopt = glibc_function("mallopt")
    if mallopt is not None:
        m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
        mallopt(m_mmap_threshold, nbytes)
