"""``stream.interleave.EventTimeMerge`` driven the way a replay drives it, with fetches of any
size in any order: every record comes out once, in offset order per partition, never ahead of
what another partition may still bring, and the merge never stalls."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.interleave import EventTimeMerge, LiveAlignment

# per partition: its records' event times (ms, in offset order, not necessarily sorted)
topics = st.lists(st.lists(st.integers(0, 20), max_size=12), min_size=1, max_size=4)


def unfetched_from(times: list[int], fetched: int) -> float:
    """The earliest event time a partition's records not fetched yet can have: -inf before
    its first fetch, +inf once all are fetched, else its last fetched record's (running
    maxima: what comes later counts as at least that)."""
    if fetched == len(times):
        return float("inf")
    return max(times[:fetched]) if fetched else float("-inf")


@settings(max_examples=300, deadline=None)
@given(topics, st.integers(0, 3), st.randoms(use_true_random=False))
def test_a_merge_releases_every_record_once_in_event_time_across_partitions(
        times, slack, rnd):
    n = len(times)
    merge: EventTimeMerge[tuple[int, int]] = EventTimeMerge(range(n), slack_ms=slack)
    fetched = [0] * n  # next offset to fetch per partition
    released: list[list[int]] = [[] for _ in range(n)]
    for p in range(n):
        if not times[p]:
            merge.exhaust(p)
    while not all(merge.drained(p) for p in range(n)):
        need = [p for p in range(n) if merge.empty(p) and not merge.exhausted(p)]
        # a fetch answers for some of the partitions asked for, with any number of records
        for p in rnd.sample(need, rnd.randint(1, len(need)) if need else 0):
            k = rnd.randint(1, len(times[p]) - fetched[p])
            merge.add(p, [(p, o) for o in range(fetched[p], fetched[p] + k)],
                      times[p][fetched[p]:fetched[p] + k])
            fetched[p] += k
            if fetched[p] == len(times[p]):
                merge.exhaust(p)
        ready = merge.release()
        assert ready or need, "stalled: records buffered, none released, nothing to fetch"
        for p, records in ready.items():
            for q, offset in records:
                assert q == p
                t = max(times[p][:offset + 1])  # its event time: the running maximum
                assert all(t <= unfetched_from(times[o], fetched[o]) + slack
                           for o in range(n) if o != p)
                released[p].append(offset)
    assert released == [list(range(len(t))) for t in times]


@settings(max_examples=300, deadline=None)
@given(topics, st.integers(0, 3), st.randoms(use_true_random=False))
def test_live_alignment_releases_every_record_once_never_ahead_of_a_partition_with_more(
        times, slack, rnd):
    """A live consumer's fetches: each round, some partitions bring some of their records; a
    partition whose records are all fetched is caught up. Every record comes out
    once, in offset order, never more than ``slack`` past what a partition that is not caught
    up may still bring (the stall guard, tested below, is out of reach here)."""
    n = len(times)
    live: LiveAlignment[tuple[int, int]] = LiveAlignment(slack_ms=slack, stall_s=1e9)
    live.reset(range(n))
    fetched, released = [0] * n, [[] for _ in range(n)]
    clock = 0.0
    while any(len(r) < len(t) for r, t in zip(released, times, strict=True)):
        assert clock < 500, "stalled: a partition holds records that never go"
        pending = [p for p in range(n) if fetched[p] < len(times[p])]
        for p in rnd.sample(pending, rnd.randint(1, len(pending)) if pending else 0):
            k = rnd.randint(1, len(times[p]) - fetched[p])
            live.add(p, [(p, o) for o in range(fetched[p], fetched[p] + k)],
                     times[p][fetched[p]:fetched[p] + k])
            fetched[p] += k
        caught_up = [p for p in range(n) if fetched[p] == len(times[p])]
        clock += 1.0
        ready = live.release(caught_up, clock)
        for p, records in ready.items():
            for q, offset in records:
                assert q == p
                t = max(times[p][:offset + 1])
                assert all(t <= unfetched_from(times[o], fetched[o]) + slack
                           for o in range(n) if o != p and o not in caught_up)
                released[p].append(offset)
            assert live.held(p) == fetched[p] - len(released[p])
    assert released == [list(range(len(t))) for t in times]
    assert live.forced == 0


def test_live_alignment_releases_what_it_holds_when_a_partition_is_never_fetched():
    """Partition 1 is assigned but never answers (paused by faust, say): partition 0's records
    wait for it ``stall_s`` of wall clock, then go (``forced`` counts them)."""
    live: LiveAlignment[str] = LiveAlignment(slack_ms=0, stall_s=5.0)
    live.reset([0, 1])
    live.add(0, ["a", "b"], [1, 2])
    assert live.release([], 100.0) == {}
    assert live.release([], 104.9) == {}
    assert live.release([], 105.0) == {0: ["a", "b"]}
    assert live.forced == 2 and live.held(0) == 0
    live.reset([0, 1])  # a rebalance drops what is held: it is fetched again
    live.add(0, ["c"], [3])
    assert live.held(0) == 1
    live.reset([0])
    assert live.held(0) == 0 and live.release([], 200.0) == {}


def test_the_stall_clock_starts_when_nothing_is_released_not_when_something_was():
    """Applying a big release can take long (seconds on a busy machine): the next empty
    release is not a stall yet. The first version counted from the last release, and a
    loaded test machine released everything held right after a long step."""
    live: LiveAlignment[str] = LiveAlignment(slack_ms=0, stall_s=5.0)
    live.reset([0, 1])
    live.add(0, ["a", "c"], [1, 100])
    live.add(1, ["x"], [2])
    assert live.release([], 100.0) == {0: ["a"]}
    assert live.release([], 100.0) == {1: ["x"]}  # 'c' waits for partition 1
    assert live.release([], 130.0) == {}  # 30 s applying 'a' and 'x': the clock starts now
    assert live.release([], 134.9) == {}
    assert live.release([], 135.0) == {0: ["c"]}
    assert live.forced == 1


def test_one_record_stamped_years_ahead_does_not_hold_its_partition_back():
    """A breaker stamped one record of partition 0 in 2100 amid a backlog of 1997-1998:
    partition 0 then counted as 2100 (running maxima) and waited until every other partition
    was caught up. Its time now counts at most the slack (or a day, if larger) past the
    partition's previous record, so partition 0 goes on with partition 1, a day at a time."""
    day = 86_400_000
    live: LiveAlignment[str] = LiveAlignment(slack_ms=7 * day)
    live.reset([0, 1])
    live.add(0, ["d0", "future", "d1", "d2", "d3"], [0, 4_000_000 * day, 1 * day, 2 * day,
                                                     3 * day])
    live.add(1, [f"e{d}" for d in range(21)], [d * day for d in range(21)])
    first = live.release([], 0.0)
    assert first[0] == ["d0", "future", "d1", "d2", "d3"]  # 'future' counts as day 7
    assert first[1] == [f"e{d}" for d in range(8)]
    assert live.release([], 0.0) == {1: [f"e{d}" for d in range(8, 15)]}  # up to 0's 7 + 7


def test_a_partitions_first_record_stamped_years_ahead_is_judged_by_the_next():
    """The breaker's record was partition 0's very first: with nothing before it, it counted
    as 2100 (after the worker's cap: the wall clock) and partition 0 waited for all others."""
    day = 86_400_000
    live: LiveAlignment[str] = LiveAlignment(slack_ms=7 * day)
    live.reset([0, 1])
    live.add(0, ["future", "d0", "d1"], [4_000_000 * day, 0, 1 * day])
    live.add(1, [f"e{d}" for d in range(3)], [d * day for d in range(3)])
    assert live.release([], 0.0) == {0: ["future", "d0", "d1"], 1: ["e0", "e1", "e2"]}


def test_future_stamps_scattered_among_good_records_keep_their_partition_at_most_a_cap_ahead():
    """A second breaker alternated records stamped now with good ones (1997) in later
    fetches: capped against the running maximum, each future stamp added a week, and after 60
    of them partition 0 counted as 429 days in and held everything while really behind."""
    day = 86_400_000
    live: LiveAlignment[str] = LiveAlignment(slack_ms=7 * day)
    live.reset([0, 1])
    live.add(0, [f"a{d}" for d in range(10)], [d * day for d in range(10)])
    live.add(1, [f"b{d}" for d in range(10)], [d * day for d in range(10)])
    while live.release([], 0.0):
        pass
    for k in range(60):
        live.add(0, [f"now{k}", f"a{10 + k}"], [20_000 * day, (10 + k) * day])
    live.add(1, [f"b{d}" for d in range(10, 81)], [d * day for d in range(10, 81)])
    released: dict[int, list[str]] = {0: [], 1: []}
    while ready := live.release([], 0.0):  # partition 1 is never caught up here
        for p, records in ready.items():
            released[p] += records
    assert len(released[0]) == 120 and live.held(0) == 0
    assert released[1] == [f"b{d}" for d in range(10, 81)]


def test_partitions_of_other_workers_hold_back_while_reported_and_not_after():
    """Hand-worked: this worker owns partition 0; another worker reports partition 1 at 12,
    then 40, then stops reporting it (died, or caught up and gone)."""
    inf = float("inf")
    live: LiveAlignment[str] = LiveAlignment(slack_ms=5, stall_s=1e9)
    live.reset([0])
    assert live.reports() == {0: (-inf, 0)}  # not fetched yet: it may bring anything
    live.add(0, ["a", "b", "c"], [10, 20, 30])
    # the metric shows what the last release left: a fetch is added, then released
    assert (live.held(0), live.held_back(0)) == (3, 0)
    live.set_external({1: (12.0, 7), 0: (-inf, 0)}, 0.0)  # its own partition's: ignored
    assert live.release([], 0.0) == {0: ["a"]}  # up to 12 + 5
    assert (live.held(0), live.held_back(0)) == (2, 2)
    assert live.reports() == {0: (20, 3)}  # its first record held; 3 fetched
    live.set_external({1: (-inf, 0)}, 0.1)  # 1's new owner has not fetched it yet
    assert live.release([], 0.1) == {}
    live.set_external({1: (40.0, 9)}, 0.2)
    assert live.release([], 0.2) == {0: ["b", "c"]}
    live.add(0, ["d"], [100])
    live.set_external({}, 0.3)  # nobody reports 1 any more: it holds nobody back
    assert live.release([], 0.3) == {0: ["d"]}
    assert live.reports() == {0: (100, 4)}  # its last record fetched
    assert live.release([0], 0.4) == {} and live.reports() == {0: (inf, 4)}  # caught up
    live.set_external({1: (50.0, 10)}, 0.5)
    live.reset([0, 1])  # a rebalance: 1 is this worker's now, nobody else's
    live.add(0, ["e"], [200])
    live.add(1, ["x"], [60])
    assert live.release([], 0.5) == {1: ["x"]}


def test_another_workers_partition_is_waited_for_while_it_fetches_and_passed_over_if_not():
    """A stall (``stall_s`` in which nothing could be released) passes over another worker's
    partition only if its report did not change meanwhile: that worker is not fetching it.
    One that keeps fetching records of one day (the two-worker test's 5,000 fillers) is
    waited for, however long (the first version passed it over after 5 s and the test's
    other worker applied its partition out of order)."""
    live: LiveAlignment[str] = LiveAlignment(slack_ms=0, stall_s=5.0)
    live.reset([0])
    live.add(0, ["a", "b"], [10, 20])
    for k in range(20):  # 1 fetches records of time 5 for 20 s: its count moves
        live.set_external({1: (5.0, 100 * k)}, 100.0 + k)
        assert live.release([0], 100.0 + k) == {}
    live.set_external({1: (5.0, 2000)}, 121.0)  # its last fetch; the same report from now on
    assert live.release([0], 125.9) == {}
    assert live.release([0], 126.0) == {0: ["a", "b"]}  # 5 s without a change
    assert live.forced == 2
    live.add(0, ["c"], [30])
    live.set_external({1: (5.0, 2000)}, 127.0)  # unchanged: still passed over
    assert live.release([], 127.0) == {0: ["c"]}
    live.add(0, ["d"], [40])
    live.set_external({1: (6.0, 2100)}, 128.0)  # it moves again: waited for again
    assert live.release([], 128.0) == {}
