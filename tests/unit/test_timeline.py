"""The watermark rule against a brute-force statement of it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from state.store import PartitionClock
from stream.timeline import TimePolicy

maybe_ms = st.one_of(st.none(), st.integers(0, 10_000))


@given(own=maybe_ms, own_active=st.booleans(), now=st.integers(0, 20_000),
       others=st.lists(st.tuples(maybe_ms, maybe_ms), max_size=5))
def test_watermark_is_the_minimum_over_active_partitions(own, own_active, now, others):
    policy = TimePolicy(idle_partition_ms=3_000)
    clocks = [PartitionClock(i + 1, w, seen) for i, (w, seen) in enumerate(others)]
    # the rule: the minimum of the highest event times of the partitions that count (own if
    # active; others seen within the idle limit, or never seen); when none counts, all do
    counted = [w for w, seen in others
               if w is not None and (seen is None or now - seen <= 3_000)]
    if own is not None and own_active:
        counted.append(own)
    if not counted:
        counted = [w for w in [own, *(w for w, _ in others)] if w is not None]
    expected = min(counted) if counted else None
    assert policy.watermark(own, clocks, now, own_active) == expected
    assert policy.clock(clocks, now)(own, own_active) == expected
