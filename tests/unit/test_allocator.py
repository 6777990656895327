"""glibc malloc settings: applied on glibc, a no-op when nothing is asked."""

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


def test_a_libc_without_mallopt_is_reported_not_raised(monkeypatch):
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert tune_malloc(131_072, 2) is False
