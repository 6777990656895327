"""Event-time interleaving of a replay's partitions.

A live worker applies every partition as its records arrive, so the partitions move through
event time together. A replay reads history that is all there at once: left alone, the
partitions a consumer happens to fetch first run ahead of the others by months of event time
(in one process or across processes). What is shared between partitions then sees a
different history from the live one: the clustering model is trained by partition 0
(``stream.trainer``), so customers of partitions that ran ahead were scored before any model
existed and kept no cluster (over half of CDNOW's customers in 4 partitions, in some runs).

:class:`EventTimeMerge` releases buffered records so that no partition applies a record
whose event time is past what another partition has fetched: a k-way merge of the
partitions in event time, by batches. Each partition's **frontier** is the event time of the
last record fetched from it (its running maximum: the records still to come are at or after
it), ``+inf`` once it has nothing left. A record of partition ``p`` is released when its
event time is at most the smallest frontier of the *other* partitions. The partition with the
smallest frontier can always release its whole buffer, so the merge never stalls; frontiers
of partitions in other processes come from them (published in Redis by the replay).

Event times here are record timestamps (epoch ms): ``rfm-stream load`` writes each event's
time there. Records produced live carry their produce time, close to their event time; the
order only paces the partitions, it changes no partition's own result.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class EventTimeMerge(Generic[T]):
    """Buffers of records per partition, released in event-time order across partitions.

    ``partitions``: every partition of the topic (those of other processes included, whose
    frontiers are then given with :meth:`set_frontier`). A partition nobody reported yet has
    frontier ``-inf``: nothing of the others is released before each was fetched once.
    ``slack_ms``: how far (ms of event time) past the others' frontiers a partition may go.

    >>> m = EventTimeMerge([0, 1], slack_ms=5)
    >>> m.add(0, ["a", "b", "c"], [10, 20, 30])
    >>> m.release()  # partition 1 not fetched yet: it could still bring event time 0
    {}
    >>> m.add(1, ["x", "y"], [15, 25])
    >>> m.release()  # 0 up to 1's next (15) + 5; 1 up to 0's next (10) + 5
    {0: ['a', 'b'], 1: ['x']}
    >>> m.release()  # 0 up to 1's next (25) + 5; 1 up to 0's next (30) + 5
    {0: ['c'], 1: ['y']}
    >>> m.add(0, ["d"], [50])
    >>> m.release(), m.frontier(1)  # 1 may still bring records at 25 (its last fetched)
    ({}, 25)
    >>> m.exhaust(1)
    >>> m.release(), m.drained(0), m.drained(1)  # 1 has no more: 0 releases all it has
    ({0: ['d']}, False, True)
    """

    def __init__(self, partitions: Iterable[int], slack_ms: float = 0):
        self.slack_ms = slack_ms
        self._fetched: dict[int, float] = {p: -math.inf for p in partitions}
        self._buffers: dict[int, deque[tuple[float, T]]] = {p: deque() for p in self._fetched}
        self._exhausted: set[int] = set()

    def add(self, partition: int, records: Sequence[T], times_ms: Sequence[float]) -> None:
        """Buffer ``records`` fetched from ``partition`` (in offset order), with their event
        times (epoch ms; a time below an earlier one counts as the earlier one)."""
        self._exhausted.discard(partition)  # a live partition that was caught up has more
        wm, buffer = self._fetched[partition], self._buffers[partition]
        for record, t in zip(records, times_ms, strict=True):
            wm = max(wm, t)
            buffer.append((wm, record))
        self._fetched[partition] = wm

    def exhaust(self, partition: int) -> None:
        """Nothing more will be fetched from ``partition`` (what is buffered stays), until
        records are added to it again (a live partition that was caught up)."""
        self._exhausted.add(partition)

    def set_frontier(self, partition: int, frontier_ms: float) -> None:
        """The frontier of a partition this merge does not buffer (another process's); a
        partition it did not know is added."""
        self._fetched[partition] = frontier_ms
        self._buffers.setdefault(partition, deque())

    def remove(self, partition: int) -> None:
        """Leave out a partition this merge does not buffer (its frontier no longer known):
        it holds nobody back any more. Raises ValueError when it holds records."""
        if self._buffers.get(partition):
            raise ValueError(f"partition {partition} holds records")
        self._fetched.pop(partition, None)
        self._buffers.pop(partition, None)
        self._exhausted.discard(partition)

    def frontier(self, partition: int) -> float:
        """Event time (epoch ms) at or after which the records still to be released from
        ``partition`` lie; ``+inf`` when it is drained, ``-inf`` before its first fetch."""
        if self.drained(partition):
            return math.inf
        buffer = self._buffers[partition]
        return buffer[0][0] if buffer else self._fetched[partition]

    def empty(self, partition: int) -> bool:
        """Whether ``partition`` has nothing buffered."""
        return not self._buffers[partition]

    def exhausted(self, partition: int) -> bool:
        """Whether nothing more will be fetched from ``partition``."""
        return partition in self._exhausted

    def drained(self, partition: int) -> bool:
        """Whether ``partition`` is exhausted and has nothing buffered."""
        return partition in self._exhausted and not self._buffers[partition]

    def release(self) -> dict[int, list[T]]:
        """Take, per partition, the buffered records whose event time is at most the smallest
        frontier of the other partitions plus the slack (partitions with none are left out)."""
        frontiers = {p: self.frontier(p) for p in self._fetched}
        out: dict[int, list[T]] = {}
        for p, buffer in self._buffers.items():
            if not buffer:
                continue
            limit = min((f for q, f in frontiers.items() if q != p),
                        default=math.inf) + self.slack_ms
            taken: list[T] = []
            while buffer and buffer[0][0] <= limit:
                taken.append(buffer.popleft()[1])
            if taken:
                out[p] = taken
        return out


class Report(NamedTuple):
    """A partition's report to the other workers of the group: its event-time frontier (epoch
    ms, may be +-inf) and the records its owner fetched of it since the assignment (which moves
    while the owner fetches, even where the frontier stands still)."""

    frontier_ms: float
    fetched: int


class LiveAlignment(Generic[T]):
    """What a live consumer applies of each fetch: the records of a partition more than
    ``slack_ms`` of event time past its other assigned partitions are held back until those
    catch up (an :class:`EventTimeMerge` over the assigned partitions).

    A live worker that starts on a backlog (after an outage, or deployed on a full topic)
    otherwise drains its partitions in whatever order the fetches bring them: on CDNOW in 4
    partitions, partition 0 (which trains the clustering model) finished months of event time
    before the others, so the last model was trained at as-of 1997-02-26 while the data runs to
    1998-06-30. In steady state nothing is held: every partition is within seconds of the
    others.

    Partitions of the topic that other workers of the group own are held against too, when
    their owners report them (:meth:`reports`, :meth:`set_external`: the worker exchanges
    them through Redis), so that a group of workers on a backlog moves through event time
    together, as a replay's processes do; a partition nobody reports holds nobody back.

    A partition that is **caught up** (nothing held, and its next offset has reached the
    broker's high watermark) holds nobody back: what it gets next is live, later than any
    backlog. A partition not fetched yet holds the others back (it may bring older records),
    so ``stall_s`` of wall clock in which nothing can be released while records are held
    releases them all (a partition that is never fetched, e.g. paused by faust, cannot stop
    the worker); ``forced`` counts those records. Record times are first made robust to a
    producer's wrong clock (:meth:`add`).

    >>> a = LiveAlignment(slack_ms=5)
    >>> a.reset([0, 1])
    >>> a.add(0, ["a", "b"], [10, 90])
    >>> a.release(caught_up=[], now_s=0.0)  # 1 not fetched yet: it may bring time 0
    {}
    >>> a.release(caught_up=[1], now_s=0.1)  # 1 has nothing: 0 goes on
    {0: ['a', 'b']}
    >>> a.add(0, ["c"], [100]); a.add(1, ["x", "y"], [20, 95])
    >>> a.release(caught_up=[0, 1], now_s=0.2)  # 0 holds 'c' (100) until 1 passes 95
    {1: ['x', 'y']}
    >>> a.release(caught_up=[1], now_s=0.3), a.held(0)
    ({0: ['c']}, 0)
    """

    def __init__(self, slack_ms: float, stall_s: float = 5.0):
        self.slack_ms = slack_ms
        self.stall_s = stall_s
        self.max_jump_ms = max(slack_ms, 86_400_000.0)  # see add()
        self._prev: dict[int, float] = {}  # per partition: its last record's time, as counted
        self.forced = 0
        self.partitions: frozenset[int] = frozenset()
        self._merge: EventTimeMerge[T] = EventTimeMerge((), slack_ms)
        self._held: dict[int, int] = {}
        self._held_back: dict[int, int] = {}
        self._stalled_since: float | None = None
        self._fetched_count: dict[int, int] = {}
        self._external: dict[int, tuple[float, ...]] = {}
        self._moved: dict[int, float] = {}  # per other worker's partition: when its report changed
        self._passed: set[int] = set()  # those a stall passed over, until their report changes

    def reset(self, partitions: Iterable[int]) -> None:
        """A new assignment: drop whatever is held (those records were not acknowledged, so
        they are fetched again) and align ``partitions`` from now on (other workers'
        partitions: given again with :meth:`set_external`)."""
        self.partitions = frozenset(partitions)
        self._merge = EventTimeMerge(self.partitions, self.slack_ms)
        self._held = dict.fromkeys(self.partitions, 0)
        self._held_back = {}
        self._prev = {}
        self._stalled_since = None
        self._fetched_count = dict.fromkeys(self.partitions, 0)
        self._external = {}
        self._moved = {}
        self._passed = set()

    def reports(self, caught_up: Iterable[int] = ()) -> dict[int, Report]:
        """What the other workers hold their partitions against, per assigned partition: its
        event-time frontier (epoch ms: the time of its first record held, else of its last
        record fetched; ``+inf`` when it is caught up now (in ``caught_up``: nothing more to
        fetch) with nothing held, or was at the last release; ``-inf`` before its first
        fetch: it may bring anything) and the records fetched of it since the assignment.

        A partition fed a trickle of old-dated records is caught up after each release, but
        a record is fetched again before the next one: reported as its last record's time,
        it held the other workers' live records back for as long as the trickle lasted (a
        breaker: 40 s and more). The single worker's own merge had never held them.

        >>> a = LiveAlignment(slack_ms=5)
        >>> a.reset([0])
        >>> a.add(0, ["old"], [10])
        >>> a.release(caught_up=[], now_s=0.0)
        {0: ['old']}
        >>> a.reports()[0].frontier_ms, a.reports(caught_up=[0])[0].frontier_ms
        (10, inf)
        """
        done = set(caught_up)
        return {p: Report(math.inf if p in done and self._merge.empty(p)
                          else self._merge.frontier(p), self._fetched_count[p])
                for p in self.partitions}

    def set_external(self, reports: Mapping[int, tuple[float, ...]], now_s: float) -> None:
        """What other workers reported of their partitions, each a frontier as
        :meth:`reports` gives it, then anything that moves while its owner works on it
        (records fetched, offset applied), at wall clock ``now_s`` (s, monotonic); the
        assigned partitions are ignored. The assigned partitions are held back against these
        from now on, and no longer against a partition left out. A partition whose report
        stays the same through a stall (``stall_s`` in which nothing could be released) is
        passed over until it changes: its owner neither fetches nor applies it."""
        given = {p: tuple(r) for p, r in reports.items() if p not in self.partitions}
        for p in self._external.keys() - given.keys():
            self._merge.remove(p)
            self._moved.pop(p, None)
            self._passed.discard(p)
        for p, r in given.items():
            if self._external.get(p) != r:
                self._moved[p] = now_s
                self._passed.discard(p)
            self._merge.set_frontier(p, math.inf if p in self._passed else r[0])
        self._external = given

    def add(self, partition: int, records: Sequence[T], times_ms: Sequence[float],
            now_ms: float = math.inf) -> None:
        """Records fetched from an assigned ``partition`` (in offset order) with their event
        times (epoch ms: record timestamps; one after the wall clock ``now_ms`` counts as now).

        A time more than :attr:`max_jump_ms` past the partition's previous record (as that
        one counted) counts as that much past it: the merge keeps each partition's running
        maximum, so one record stamped years ahead (a producer's clock) would make its
        partition count as ahead from then on, held until every other partition is caught up
        (a breaker's finding: 17,743 of CDNOW's 23,570 customers left without a cluster);
        measured from the previous record itself, not the running maximum, such records
        scattered among good ones put their partition at most that much ahead (measured from
        the maximum, each added a week: a second breaker's finding). A partition's first
        records, which have no predecessor, are judged by the records after them in the same
        fetch. A run of records that really jumps catches up at that much per record."""
        jump = self.max_jump_ms
        prev = self._prev.get(partition)
        capped = [min(t, now_ms) for t in times_ms]
        if prev is None:  # the partition's first records have no predecessor: judged by the next
            for i in range(len(capped) - 2, -1, -1):
                capped[i] = min(capped[i], capped[i + 1] + jump)
        for i, t in enumerate(capped):
            if prev is not None and t > prev + jump:
                capped[i] = t = prev + jump
            prev = t
        if prev is not None:
            self._prev[partition] = prev
        self._merge.add(partition, records, capped)
        self._held[partition] += len(records)
        self._fetched_count[partition] += len(records)

    def oldest_held_ms(self) -> float | None:
        """Event time (epoch ms) of the oldest first record held by an assigned partition
        (None: nothing held)."""
        return min((self._merge.frontier(p) for p in self.partitions if self._held[p]),
                   default=None)

    def held(self, partition: int) -> int:
        """How many records ``partition`` holds back now (records just added count until
        the next :meth:`release`)."""
        return self._held.get(partition, 0)

    def held_back(self, partition: int) -> int:
        """How many records ``partition`` held back after the last :meth:`release` (what a
        metric shows: records of a fetch are added, then released, with a round trip to the
        other workers in between)."""
        return self._held_back.get(partition, 0)

    @property
    def holding(self) -> bool:
        """Whether any partition holds records back now."""
        return any(self._held.values())

    def release(self, caught_up: Iterable[int], now_s: float) -> dict[int, list[T]]:
        """The held records that may be applied now, per partition (in offset order), given
        the partitions that are caught up and the wall clock (seconds, monotonic)."""
        for p in caught_up:
            if p in self.partitions and self._merge.empty(p):
                self._merge.exhaust(p)
        out = self._merge.release()
        if not out and self.holding:
            # the stall clock starts at the first call that releases nothing (not at the last
            # that did: applying what it released may take long)
            if self._stalled_since is None:
                self._stalled_since = now_s
            elif now_s - self._stalled_since >= self.stall_s:  # stalled: release everything
                for p in self.partitions:
                    self._merge.exhaust(p)
                # and pass over the other workers' partitions whose report did not change
                # meanwhile (until it does): a worker that fetches or applies a partition
                # whose event time stands still (a day's backlog) is not stuck: waited for
                for p, moved in self._moved.items():
                    if now_s - moved >= self.stall_s:
                        self._passed.add(p)
                        self._merge.set_frontier(p, math.inf)
                out = self._merge.release()
                self.forced += sum(len(v) for v in out.values())
        if out or not self.holding:
            self._stalled_since = None
        for p, records in out.items():
            self._held[p] -= len(records)
        self._held_back = dict(self._held)
        return out


def not_caught_up(reports: Mapping[int, tuple[float, ...]], ends: Mapping[int, int]
                  ) -> set[int]:
    """The partitions another worker reports caught up (frontier ``+inf``) while records lie
    past their applied offset: ``ends`` maps a partition to its end offset (the next offset
    to be written), a report is ``(frontier, fetched, applied offset)`` (-1: none applied).

    A report of ``+inf`` says "caught up as of my last fetch": a backlog produced since,
    which its owner has not fetched yet, is not in it. A fresh user's test run under load
    saw a worker release 150 records of its partition against such a report while the other
    partition's 5,000 older records had not been fetched (8,001 pairs of customers published
    out of order).

    >>> not_caught_up({0: (math.inf, 9, 41), 1: (math.inf, 3, 2), 2: (5.0, 1, 0)},
    ...               {0: 42, 1: 9, 2: 99})
    {1}
    """
    return {p for p, r in reports.items()
            if r[0] == math.inf and p in ends and ends[p] - 1 > r[2]}
