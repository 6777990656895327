"""``stream.interleave.EventTimeMerge`` driven the way a replay drives it, with fetches of any
size in any order: every record comes out once, in offset order per partition, never ahead of
what another partition may still bring, and the merge never stalls."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.interleave import EventTimeMerge

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
