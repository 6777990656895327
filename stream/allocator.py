"""Memory settings of a long-running worker process: glibc's ``malloc`` and Python's cyclic
garbage collector.

**malloc.**
A worker frees large buffers every batch (fetched record sets, Redis replies, the commit's Lua
arguments), from two threads (faust runs the Kafka consumer in a thread of its own). With
glibc's defaults the resident set size then creeps up without any object being kept: after a
large ``mmap``-ed block is freed glibc raises its mmap threshold (up to 32 MiB), so later
buffers of that size come from the heap and leave holes there, and every thread may get an
arena of its own. ``bench/rss_soak.py`` measured it (400,000 events): the heap's free bytes
grew from 10 to 44-53 MiB with the defaults and stayed at 4-12 MiB (over a million events)
with a fixed threshold and two arenas.

The threshold is fixed above the worker's batch buffers (4 MiB by default), not at glibc's
initial 128 KiB: below it, every fetched record set, commit argument, Redis reply and outbox
produce request (up to 1 MiB, copied several times on its way to the socket) would be a fresh
``mmap`` whose pages fault in anew, then an ``munmap``; that cost ~10x a heap copy (four copies
of 1 MB: 3.96 ms against 0.41 ms) and about a tenth of the worker's throughput
(``docs/performance.md``, "Seventh pass"). RSS stayed flat with 4 MiB.

Source: glibc manual, "Memory Allocation Tunables" and ``mallopt(3)`` (``M_MMAP_THRESHOLD``:
setting it disables the dynamic adjustment; ``M_ARENA_MAX``).

**The cyclic GC.** A worker allocates and frees many container objects per event (records,
named tuples of state, change dicts), so with Python's default thresholds (700, 10, 10) it runs
young collections every few hundred of them, and a full collection, which walks every tracked
object (200,000-260,000 once faust, River and their imports are loaded), every few seconds:
110-220 ms each, measured with ``gc.callbacks`` under ``bench/latency.py --rate 2500``, a
pause that every record in flight waits for. :func:`tune_gc` makes collections rarer, and
:func:`freeze_gc`, called once the worker has started, moves what start-up created to the
permanent generation, which collections skip (what ``gc.freeze`` is for; Python docs, "gc").
Full collections then took 13-80 ms, and ``make bench`` went from ~5,400 to ~7,300 events/s
(``docs/performance.md``, "Fifth pass").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time

log = logging.getLogger(__name__)

MAX_GC_THRESHOLD = 10_000_000  # beyond this, collection is off in practice
M_MMAP_THRESHOLD = -3  # mallopt(3) parameter numbers, from glibc's malloc.h
M_ARENA_MAX = -8


def tune_malloc(mmap_threshold_bytes: int, arena_max: int) -> bool:
    """Set glibc's mmap threshold and arena count for this process; call before any thread.

    Parameters
    ----------
    mmap_threshold_bytes
        Blocks at least this large are ``mmap``-ed and returned to the system on ``free``
        (bytes; 0 leaves glibc's dynamic threshold).
    arena_max
        Most malloc arenas (0 leaves glibc's default, 8 per core).

    Returns True when every setting asked for was applied; False (logged, never raised) on a
    C library that is not glibc, such as musl or macOS's.
    """
    asked = [(p, v) for p, v in ((M_MMAP_THRESHOLD, mmap_threshold_bytes),
                                 (M_ARENA_MAX, arena_max)) if v]
    if not asked:
        return True
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        log.info("malloc settings not applied (no glibc mallopt: %s)", e)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in asked)  # mallopt returns 1 on success
    if not ok:
        log.warning("glibc refused a malloc setting %s", asked)
    return ok


def tune_gc(thresholds: tuple[int, int, int]) -> None:
    """Set the cyclic garbage collector's thresholds (``gc.set_threshold``).

    Parameters
    ----------
    thresholds
        (allocations minus deallocations of container objects between two young collections,
        young collections between two middle ones, middle between two full ones); Python's
        default is (700, 10, 10).

    Raises
    ------
    ValueError
        When a threshold is outside ``1..MAX_GC_THRESHOLD`` (0 turns collection off, and so,
        in practice, does a huge value; above 2**31 - 1 ``gc`` itself refuses it).
    """
    if len(thresholds) != 3 or not all(1 <= t <= MAX_GC_THRESHOLD for t in thresholds):
        raise ValueError(f"GC thresholds must be three integers in 1..{MAX_GC_THRESHOLD:,}, "
                         f"got {thresholds!r}")
    gc.set_threshold(*thresholds)


def freeze_gc() -> int:
    """Collect once, then move every object alive to the permanent generation (``gc.freeze``)
    so that later collections skip them; call once the process has started. Returns how many
    objects are frozen. Objects frozen are never collected, even if they become cyclic garbage
    later: a bounded, one-time cost of what start-up made."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("GC: %d objects of start-up frozen in %.0f ms", frozen,
             (time.perf_counter() - started) * 1000)
    return frozen


def settle_gc(thresholds: tuple[int, int, int], freeze: bool) -> None:
    """:func:`tune_gc`, then :func:`freeze_gc` if asked: for a process that has imported what
    it runs and starts its work now (a replay). A worker sets the thresholds before its imports
    and freezes once faust has started instead."""
    tune_gc(thresholds)
    if freeze:
        freeze_gc()
