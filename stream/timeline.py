"""Event time: the as-of time a partition scores at, and when a customer is next due. Pure.

The global event-time watermark (README, "RFM definitions") is the minimum over the active
partitions of their highest applied event time. A partition whose last applied event is older
than ``idle_partition_ms`` of wall-clock time stops holding it back (as Flink's
``withIdleness``). Each partition keeps its own as-of time in Redis, which never moves back:
``as_of = max(previous as_of, watermark)``. In ``wall_clock`` mode the as-of time is the wall
clock instead (live scoring of a stream whose producers are quiet).

The clock enters only as an argument (``now_ms``); nothing here reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from state.rfm import Window
from state.store import PartitionClock

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TimePolicy:
    """How time moves scores.

    Parameters
    ----------
    mode
        ``watermark`` (event time; replays are deterministic) or ``wall_clock``.
    idle_partition_ms
        Wall-clock time (ms) after which a partition with no applied event stops holding the
        watermark back; 0: never.
    min_dwell_ms
        Flapping guard: after a published change, a customer keeps its segment for at least
        this much event time (ms) unless a purchase moves it; 0: off.
    rescore_spacing_ms
        Event time (ms) between two customers re-scored after a threshold refresh: the rate
        limit of ``cause="rescore"`` changes.
    window
        Optional sliding window for frequency and monetary.
    """

    mode: Literal["watermark", "wall_clock"] = "watermark"
    idle_partition_ms: int = 60_000
    min_dwell_ms: int = 86_400_000
    rescore_spacing_ms: int = 10
    window: Window | None = None

    def active(self, seen_ms: int | None, now_ms: int) -> bool:
        """Whether a partition whose last event was applied at wall clock ``seen_ms`` still
        holds the watermark back (not idle).

        >>> TimePolicy(idle_partition_ms=10).active(0, 10), TimePolicy(idle_partition_ms=10).active(0, 11)
        (True, False)
        """
        return (self.idle_partition_ms == 0 or seen_ms is None
                or now_ms - seen_ms <= self.idle_partition_ms)

    def watermark(self, own: int | None, others: Sequence[PartitionClock], now_ms: int,
                  own_active: bool = True) -> int | None:
        """The global event-time watermark (epoch ms) seen from one partition.

        ``own``: the partition's highest event time; ``own_active``: whether it counts (a
        partition with nothing new of its own, swept by the timer, may be idle itself). When
        every partition is idle, all count. None when no partition has an event.

        >>> p = TimePolicy(idle_partition_ms=1000)
        >>> others = [PartitionClock(1, 50, 9_500), PartitionClock(2, 20, 5_000)]
        >>> p.watermark(100, others, now_ms=10_000)  # partition 2 idle for 5 s
        50
        >>> p.watermark(100, others, now_ms=10_000, own_active=False)
        50
        >>> p.watermark(100, others, now_ms=99_000)  # everyone else idle
        100
        """
        return self.clock(others, now_ms)(own, own_active)

    def clock(self, others: Sequence[PartitionClock], now_ms: int
              ) -> Callable[[int | None, bool], int | None]:
        """:meth:`watermark` with the other partitions' clocks and the wall clock fixed:
        ``f(own, own_active)``, for the per-record path of a step."""
        live = [c.watermark for c in others
                if c.watermark is not None and self.active(c.seen_ms, now_ms)]
        live_min = min(live) if live else None
        every = [c.watermark for c in others if c.watermark is not None]
        every_min = min(every) if every else None

        def watermark(own: int | None, own_active: bool = True) -> int | None:
            if own is not None and own_active:
                return own if live_min is None or own < live_min else live_min
            if live_min is not None:
                return live_min
            candidates = [w for w in (own, every_min) if w is not None]
            return min(candidates) if candidates else None

        return watermark

    def as_of(self, previous: int | None, own: int | None, others: Sequence[PartitionClock],
              now_ms: int, own_active: bool = True) -> int | None:
        """The partition's next as-of time: never before ``previous``.

        >>> TimePolicy().as_of(70, 60, [], now_ms=0), TimePolicy().as_of(None, 60, [], 0)
        (70, 60)
        >>> TimePolicy(mode="wall_clock").as_of(70, 60, [], now_ms=5_000)
        5000
        """
        t = now_ms if self.mode == "wall_clock" else self.watermark(own, others, now_ms,
                                                                     own_active)
        if t is None:
            return previous
        return t if previous is None else max(previous, t)

    def dwell_until(self, changed_ms: int | None) -> int | None:
        """Until when (event time, ms) a customer changed at ``changed_ms`` keeps its segment
        against anything but a purchase; None when the guard does not hold it.

        >>> TimePolicy(min_dwell_ms=10).dwell_until(5), TimePolicy(min_dwell_ms=0).dwell_until(5)
        (15, None)
        """
        if changed_ms is None or self.min_dwell_ms <= 0:
            return None
        return changed_ms + self.min_dwell_ms


@functools.lru_cache(maxsize=4096)
def utc(ms: int) -> datetime:
    """An epoch-ms time as an aware UTC datetime, exactly (integer arithmetic: a float of
    seconds loses microseconds far from 1970) and cached (a step stamps many changes with the
    same as-of and emission times).

    Raises
    ------
    OverflowError
        Beyond the years 1-9999.

    >>> utc(0).isoformat()
    '1970-01-01T00:00:00+00:00'
    >>> utc(253_402_300_799_999).isoformat()  # 9999-12-31T23:59:59.999Z
    '9999-12-31T23:59:59.999000+00:00'
    """
    return _EPOCH + timedelta(milliseconds=ms)


def iso(ms: int | None) -> str | None:
    """An epoch-ms time as ISO-8601 UTC text ending in ``Z``, as the events' times (None
    stays None).

    >>> iso(1_700_000_000_123), iso(None)
    ('2023-11-14T22:13:20.123000Z', None)
    """
    return None if ms is None else utc(ms).isoformat().replace("+00:00", "Z")


def earliest(*times: int | None) -> int | None:
    """The earliest of the given times, ignoring None.

    >>> earliest(None, 5, 3), earliest(None)
    (3, None)
    """
    best = None
    for t in times:
        if t is not None and (best is None or t < best):
            best = t
    return best
