"""Worker memory settings: glibc malloc (applied on glibc, a no-op when nothing is asked) and
Python's cyclic GC (thresholds, freezing what start-up made)."""

import ctypes
import ctypes.util

import pytest

from stream.allocator import tune_malloc


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"),
                       "gnu_get_libc_version")
    except OSError:
        return False


def test_nothing_asked_is_a_no_op():
    assert tune_malloc(0, 0) is True


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_glibc_accepts_the_worker_defaults():
    from stream.settings import Settings

    s = Settings()
    assert s.malloc_mmap_threshold_bytes > 0 and s.malloc_arena_max > 0
    assert tune_malloc(s.malloc_mmap_threshold_bytes, s.malloc_arena_max) is True


@pytest.mark.parametrize("field, value", [("malloc_mmap_threshold_bytes", 2**31),
                                          ("malloc_mmap_threshold_bytes", 2**32 + 131_072),
                                          ("malloc_mmap_threshold_bytes", 33_554_433),
                                          ("malloc_arena_max", 2**31)])
def test_malloc_settings_beyond_what_mallopt_takes_are_refused(field, value):
    """mallopt takes a C int: 2**31 would wrap negative, 2**32 + 128 KiB to 128 KiB, and
    glibc's threshold stops at 32 MiB; such values are refused, not applied as something else."""
    from pydantic import ValidationError

    from stream.settings import Settings

    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


MAPPED = """
import ctypes, ctypes.util, sys
from stream.allocator import tune_malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped(size):  # whether a block of this size is served by its own mmap
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(block)
    return during - before

assert tune_malloc(int(sys.argv[1]), 0)
print(*(mapped(size) for size in (256 * 1024, 2 * 2**20, 8 * 2**20)))
"""


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
@pytest.mark.parametrize("threshold, expected", [(4 * 2**20, "0 0 1"), (1 * 2**20, "0 1 1"),
                                                 (128 * 1024, "1 1 1")])
def test_the_mmap_threshold_decides_which_blocks_are_mapped(threshold, expected):
    """What the setting does, seen from glibc (``mallinfo2``'s count of mmap-ed blocks) in a
    process of its own: blocks of 256 KiB, 2 MiB and 8 MiB are each mmap-ed exactly when
    they are at least the threshold (mallopt(3), M_MMAP_THRESHOLD)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MAPPED, str(threshold)], capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.split() == expected.split()


def test_a_libc_without_mallopt_is_reported_not_raised(monkeypatch):
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert tune_malloc(131_072, 2) is False


@pytest.fixture
def gc_state():
    import gc

    thresholds = gc.get_threshold()
    yield gc
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_gc_thresholds_are_set_and_zero_is_refused(gc_state):
    from stream.allocator import tune_gc

    tune_gc((12_345, 7, 9))
    assert gc_state.get_threshold() == (12_345, 7, 9)
    with pytest.raises(ValueError, match="1..10,000,000"):
        tune_gc((0, 10, 10))  # would turn the collector off
    with pytest.raises(ValueError, match="1..10,000,000"):
        tune_gc((2**31, 10, 10))  # gc.set_threshold would raise OverflowError
    assert gc_state.get_threshold() == (12_345, 7, 9)


def test_freeze_moves_live_objects_out_of_the_collectors_reach(gc_state):
    from stream.allocator import freeze_gc

    gc_state.unfreeze()
    assert gc_state.get_freeze_count() == 0
    tracked = len(gc_state.get_objects())
    frozen = freeze_gc()
    # frozen objects that are freed later leave the permanent generation: allow a few
    assert frozen > 0 and frozen - 1000 < gc_state.get_freeze_count() <= frozen
    # what is frozen is no longer in any generation a collection walks
    assert len(gc_state.get_objects()) < tracked - frozen // 2


def test_settings_refuse_gc_thresholds_of_zero_or_too_large():
    from pydantic import ValidationError

    from stream.settings import Settings

    with pytest.raises(ValidationError, match="gc_thresholds"):
        Settings(gc_thresholds=(700, 0, 10))
    with pytest.raises(ValidationError, match="gc_thresholds"):
        Settings(gc_thresholds=(2**31, 20, 20))
