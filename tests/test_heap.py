import sys

import pytest

from hf_efficient import heap


def test_unknown_functions_are_none_and_calls_are_safe():
    assert heap.glibc_function("no_such_function_in_any_libc") is None
    heap.release_free_heap()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_release_returns_freed_heap_to_the_os():
    import psutil

    proc = psutil.Process()
    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # ~250 MiB of heap-sized blocks
    keep = blocks[-1]
    del blocks
    before = proc.memory_info().rss
    heap.release_free_heap()
    assert proc.memory_info().rss < before - 100 * 2**20 and len(keep) == 64 * 1024
