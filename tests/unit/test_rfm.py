"""The pure RFM fold: hand-worked timelines and a property against an independent oracle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from state.rfm import (
    CustomerState,
    Limits,
    StateEvent,
    Window,
    apply_event,
    frequency_monetary,
    window_expiry_ms,
)

DAY = 86_400_000


def fold(events, limits=Limits(), window=None):
    s = None
    for e in events:
        s, _ = apply_event(s, e, limits, window)
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
    # frequency: o1, o2, o0 = 3 (o2 only partly refunded); 10 + 5.5 + 20 + 1 - 12 = 24.50
    assert (s.frequency, s.purchases_minor, s.refunds_minor, s.monetary_minor) == (3, 3650, 1200, 2450)
    # the late event moved first purchase back, not last; the refund did not refresh recency
    assert (s.first_purchase_ms, s.last_purchase_ms) == (5 * DAY, 20 * DAY)


def test_monetary_never_below_zero_and_refund_only_customer_is_not_scored():
    s = fold([StateEvent("r1", "o9", "refund", 500, DAY)])
    assert s.monetary_minor == 0 and not s.has_purchased
    s2, _ = apply_event(s, StateEvent("p1", "o1", "purchase", 300, 2 * DAY))
    assert s2.monetary_minor == 0 and s2.frequency == 1 and s2.has_purchased


def test_memory_is_bounded():
    limits = Limits(event_ids=4, order_ids=3, text_ids=True)  # ids short enough to stay text
    s = fold([StateEvent(f"e{i}", f"o{i}", "purchase", 1, i) for i in range(50)], limits)
    assert s.recent_event_ids == ("e49", "e48", "e47", "e46")
    assert [o.order_id for o in s.orders] == ["o49", "o48", "o47"]
    assert s.frequency == 50


def test_a_full_refund_removes_the_order_from_frequency_a_partial_one_does_not():
    s = fold([
        StateEvent("a", "o1", "purchase", 3000, 1 * DAY),   # o1: $30
        StateEvent("b", "o2", "purchase", 2000, 2 * DAY),   # o2: $20
        StateEvent("c", "o1", "refund", 1000, 3 * DAY),     # $10 of o1 back: partial
    ])
    assert (s.frequency, s.monetary_minor) == (2, 4000)
    s, _ = apply_event(s, StateEvent("d", "o1", "refund", 2000, 4 * DAY))  # the rest of o1
    assert (s.frequency, s.monetary_minor, s.last_purchase_ms) == (1, 2000, 2 * DAY)
    s, _ = apply_event(s, StateEvent("e", "o1", "refund", 500, 5 * DAY))  # o1 over-refunded
    assert (s.frequency, s.monetary_minor) == (1, 1500)
    s, _ = apply_event(s, StateEvent("f", "o1", "purchase", 900, 6 * DAY))  # o1 bought again
    assert (s.frequency, s.monetary_minor, s.last_purchase_ms) == (2, 2400, 6 * DAY)
    # a refund naming an order no longer remembered (or never seen) only reduces monetary
    t = fold([StateEvent("x", "old", "purchase", 700, 0), StateEvent("y", "o2", "purchase", 1, 0),
              StateEvent("z", "o3", "purchase", 1, 0), StateEvent("r", "old", "refund", 700, 0)],
             Limits(order_ids=2))
    assert (t.frequency, t.monetary_minor) == (3, 2)


def test_late_events_never_move_recency_back():
    s = fold([StateEvent("a", "o1", "purchase", 100, 50 * DAY),
              StateEvent("b", "o2", "purchase", 100, 10 * DAY),     # 40 days late
              StateEvent("c", "o3", "refund", 50, 90 * DAY)])       # a later refund
    assert (s.last_purchase_ms, s.first_purchase_ms, s.frequency) == (50 * DAY, 10 * DAY, 2)


def test_window_counts_the_last_buckets_only_and_says_when_they_expire():
    w = Window(days=90, bucket_days=30)  # buckets of days [0,30), [30,60), ...
    s = fold([
        StateEvent("a", "o1", "purchase", 1000, 5 * DAY),     # bucket 0
        StateEvent("b", "o2", "purchase", 2000, 40 * DAY),    # bucket 1
        StateEvent("c", "o3", "purchase", 4000, 100 * DAY),   # bucket 3
        StateEvent("d", "o2", "refund", 2000, 101 * DAY),     # all of o2 (bucket 1) back
    ], window=w)
    # at day 100 the window is buckets 1..3: o3 (o2 returned); 2000 + 4000 - 2000
    assert frequency_monetary(s, 100 * DAY, w) == (1, 4000)
    assert (s.frequency, s.monetary_minor) == (2, 5000)  # all-time: o1, o3
    # bucket 1 (still non-empty in money) leaves the window at day 120
    assert window_expiry_ms(s, 100 * DAY, w) == 120 * DAY
    assert frequency_monetary(s, 120 * DAY, w) == (1, 2000)  # bucket 3 keeps the refund
    # at most 3 buckets are kept: bucket 0 was dropped when bucket 3 came
    assert [b.index for b in s.buckets] == [1, 3]
    late, applied = apply_event(s, StateEvent("e", "o0", "purchase", 9, 0), window=w)
    assert applied and late.buckets == s.buckets and late.frequency == 3


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
    # an order counts unless refunds naming it after its first purchase cover it in full
    bought, back = {}, {}
    for e in first:
        if e.kind == "purchase":
            bought[e.order_id] = bought.get(e.order_id, 0) + e.amount_minor
        elif e.order_id in bought:
            back[e.order_id] = back.get(e.order_id, 0) + e.amount_minor
    counted = [o for o, b in bought.items() if not 0 < b <= back.get(o, 0)]
    s = fold(seq, Limits(event_ids=100, order_ids=100)) or CustomerState()
    assert s.frequency == len(counted)
    assert s.monetary_minor == max(0, sum(e.amount_minor for e in buys) - refunds)
    assert s.last_purchase_ms == (max(e.occurred_ms for e in buys) if buys else None)
    assert s.first_purchase_ms == (min(e.occurred_ms for e in buys) if buys else None)
