"""The C heap under long-running work (glibc): few arenas, freed memory given back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import heap
from engine.threads import on_fresh_thread

ROOT = Path(__file__).resolve().parents[1]

_ARENAS = """
import ctypes, sys, threading
from engine import heap
if sys.argv[1] == "limited":
    assert heap.limit_arenas(1)
meet = threading.Barrier(6)

def work():
    meet.wait()
    blocks = [bytearray(4096) for _ in range(2000)]
    meet.wait()                                 # every thread's blocks alive at once
    del blocks

threads = [threading.Thread(target=work) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()                # one "Arena n:" paragraph per arena, on stderr
"""


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _arenas(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _ARENAS, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(heap._libc("mallopt") is None, reason="the C library has no arenas to limit")
def test_threads_allocating_at_once_share_the_arenas_they_are_limited_to() -> None:
    assert _arenas("default") > 1
    assert _arenas("limited") == 1


@pytest.mark.skipif(heap._libc("malloc_trim") is None, reason="the C library cannot give freed memory back")
def test_memory_that_long_work_freed_goes_back_to_the_system() -> None:
    """256 MiB in 64 KiB pieces (below the size the allocator maps on its own), a few kept alive
    between the holes as a fit's results are: the freed pieces would stay resident untrimmed."""
    kept: list[np.ndarray] = []

    def work() -> None:
        pieces = [np.ones(8192) for _ in range(4096)]
        kept.extend(pieces[::64])

    before = _resident_bytes()
    on_fresh_thread(work)
    assert len(kept) == 64
    assert _resident_bytes() - before < 64 * 2**20


_CYCLES = """
import ctypes, resource, sys
from engine import heap
if sys.argv[1] == "kept":
    assert heap.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def cycle():
    # a forward pass's activations: blocks of 1-4 MiB, written, then all freed
    blocks = [libc.malloc(size) for size in [4 << 20, 1 << 20, 3 << 20, 2 << 20] * 2]
    for block, size in zip(blocks, [4 << 20, 1 << 20, 3 << 20, 2 << 20] * 2):
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)

for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CYCLES, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(heap._libc("mallopt") is None, reason="the C library has no thresholds to set")
def test_blocks_freed_by_one_pass_serve_the_next_without_page_faults() -> None:
    """20 MiB of blocks allocated, written and freed ten times (a forward pass's activations are
    ~18 MiB at 416 px): with glibc's adaptive thresholds the pages go back to the system each time
    and come back as faults; kept, they are reused."""
    assert _faults("default") > 10 * 1000
    assert _faults("kept") < 200
