"""The pure RFM fold: hand-worked timelines and a property against an independent oracle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from state.rfm import (
    CustomerState,
    Limits,
    PartitionState,
    Record,
    StateEvent,
    apply_batch,
    apply_event,
)

DAY = 86_400_000


def fold(events, limits=Limits()):
    s = None
    for e in events:
        s, _ = apply_event(s, e, limits)
    return s


def test_hand_worked_timeline():
    s = fold([
        StateEvent("e1", "o1", "purchase", 1000, 10 * DAY),   # order 1, line 1: $10.00
        StateEvent("e2", "o1", "purchase", 550, 10 * DAY),    # order 1, line 2: $5.50
        StateEvent("e3", "o2", "purchase", 2000, 20 * DAY),   # order 2: $20.00
        StateEvent("e3", "o2", "purchase", 2000, 20 * DAY),   # duplicate of e3
        StateEvent("e4", "o0", "purchase", 100, 5 * DAY),     # late order 0: $1.00
        StateEvent("e5", "o2", "refund", 1200, 30 * DAY),     # refund $12.00 of order 2
    ])
    # frequency: o1, o2, o0 = 3; monetary 10 + 5.5 + 20 + 1 - 12 = 24.50
    assert (s.frequency, s.purchases_minor, s.refunds_minor, s.monetary_minor) == (3, 3650, 1200, 2450)
    # the late event moved first purchase back, not last; the refund did not refresh recency
    assert (s.first_purchase_ms, s.last_purchase_ms) == (5 * DAY, 20 * DAY)


def test_monetary_never_below_zero_and_refund_only_customer_is_not_scored():
    s = fold([StateEvent("r1", "o9", "refund", 500, DAY)])
    assert s.monetary_minor == 0 and not s.has_purchased
    s2, _ = apply_event(s, StateEvent("p1", "o1", "purchase", 300, 2 * DAY))
    assert s2.monetary_minor == 0 and s2.frequency == 1 and s2.has_purchased


def test_memory_is_bounded():
    limits = Limits(event_ids=4, order_ids=3)
    s = fold([StateEvent(f"e{i}", f"o{i}", "purchase", 1, i) for i in range(50)], limits)
    assert s.recent_event_ids == ("e49", "e48", "e47", "e46")
    assert s.recent_order_ids == ("o49", "o48", "o47")
    assert s.frequency == 50


events = st.builds(
    StateEvent,
    event_id=st.sampled_from([f"e{i}" for i in range(12)]),
    order_id=st.sampled_from([f"o{i}" for i in range(5)]),
    kind=st.sampled_from(["purchase", "refund"]),
    amount_minor=st.integers(0, 10**6),
    occurred_ms=st.integers(0, 400 * DAY),
)


@given(st.lists(events, max_size=40))
@settings(max_examples=300, deadline=None)
def test_fold_matches_independent_oracle(seq):
    # oracle: the first occurrence of each event_id counts (limits big enough not to evict)
    seen, first = set(), []
    for e in seq:
        if e.event_id not in seen:
            seen.add(e.event_id)
            first.append(e)
    buys = [e for e in first if e.kind == "purchase"]
    refunds = sum(e.amount_minor for e in first if e.kind == "refund")
    s = fold(seq, Limits(event_ids=100, order_ids=100)) or CustomerState()
    assert s.frequency == len({e.order_id for e in buys})
    assert s.monetary_minor == max(0, sum(e.amount_minor for e in buys) - refunds)
    assert s.last_purchase_ms == (max(e.occurred_ms for e in buys) if buys else None)
    assert s.first_purchase_ms == (min(e.occurred_ms for e in buys) if buys else None)


def test_batch_skips_applied_offsets_and_dead_letters_advance_offset():
    recs = [Record(0, "c1", StateEvent("e1", "o1", "purchase", 100, DAY)),
            Record(1, None, None),
            Record(2, "c1", StateEvent("e2", "o2", "purchase", 100, 3 * DAY))]
    p1, c1, out1 = apply_batch(PartitionState(), {}, recs)
    assert (p1.last_offset, p1.max_event_ms, out1.applied) == (2, 3 * DAY, 2)
    p2, c2, out2 = apply_batch(p1, c1, recs)  # a redelivery of the whole batch
    assert (p2, c2, out2.applied, out2.duplicate_offsets) == (p1, c1, 0, 2)
    # the same event under a new offset (published twice) is applied once
    p3, c3, out3 = apply_batch(p2, c2, [Record(3, "c1", recs[0].event)])
    assert (c3 == c2, out3.duplicate_events, p3.last_offset) == (True, 1, 3)
