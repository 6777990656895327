"""Time moves segments without events: hand-worked inactivity timelines (fixed thresholds
R=5 up to 30 days, R=4 from 31), idle partitions, the flapping guard; the batch processor
against a real Redis."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from stream.pipeline import RawRecord
from stream.services import build_services

NOW = 1_800_000_000_000  # wall clock of the tests (2027): after every event time used
DAY = 86_400_000


def purchase(n: int, customer: str, at: str, order: str | None = None, kind: str = "purchase",
             amount: str = "10.00") -> bytes:
    return json.dumps({"event_id": f"e{n}", "customer_id": customer, "order_id": order or f"o{n}",
                       "type": kind, "amount": amount, "currency": "USD",
                       "occurred_at": at if "T" in at else f"{at}T00:00:00Z"}).encode()


def raw(offset: int, customer: str, value: bytes, partition: int = 0) -> RawRecord:
    return RawRecord("purchases", partition, offset, customer.encode(), value)


def ms(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
async def fixed(settings):
    s = build_services(settings.model_copy(update={"partitions": 1, "scoring_mode": "fixed"}))
    yield s
    await s.store.client.aclose()


@pytest.fixture
async def fixed_2(settings):
    s = build_services(settings.model_copy(update={"partitions": 2, "scoring_mode": "fixed",
                                                   "idle_partition_s": 60.0}))
    yield s
    await s.store.client.aclose()


TIMELINE = [  # (offset, customer, event time): x buys once on day 0; others move the watermark
    (0, "x", "2024-01-01"),
    (1, "a", "2024-01-11"),            # day 10
    (2, "b", "2024-01-31"),            # day 30: x is 30 days old, still R5
    (3, "c", "2024-01-31T23:59:59Z"),  # still day 30
    (4, "d", "2024-02-01"),            # day 31: x -> R4, New Customers -> Promising
    (5, "e", "2024-02-02"),
    (6, "f", "2024-03-31"),            # day 90: still R4
    (7, "g", "2024-04-01"),            # day 91: x -> R3, About To Sleep
    (8, "h", "2024-04-02"),
]


def records(rows=TIMELINE):
    return [raw(o, c, purchase(o, c, t)) for o, c, t in rows]


async def test_one_inactivity_change_exactly_when_the_watermark_passes_day_31(fixed):
    per_offset = []
    for rec in records():
        out = await fixed.processor.process(0, [rec], now_ms=NOW)
        per_offset.append([c for c in out.changes if c.customer_id == "x"])
    first, *rest = per_offset
    assert [c.current.segment for c in first] == ["New Customers"]
    assert [len(c) for c in rest] == [0, 0, 0, 1, 0, 0, 1, 0]
    (r4,), (r3,) = rest[3], rest[6]
    assert (r4.cause, r4.previous.segment, r4.current.segment) == (
        "inactivity", "New Customers", "Promising")
    assert (r4.recency_days, r4.r_score, r4.f_score, r4.cause_event_id) == (31, 4, 1, None)
    assert r4.occurred_at == r4.as_of == datetime(2024, 2, 1, tzinfo=UTC)
    assert (r3.cause, r3.current.segment, r3.recency_days, r3.r_score) == (
        "inactivity", "About To Sleep", 91, 3)
    stored = await fixed.store.read_customer(0, "x")
    assert (stored.segment, stored.scores) == ("About To Sleep", (3, 1, 1))
    # a redelivery of everything emits nothing more
    again = await fixed.processor.process(0, records(), now_ms=NOW)
    assert again.changes == [] and again.applied == 0


async def test_the_same_timeline_in_one_batch_gives_the_same_changes(fixed, settings):
    one_by_one = []
    for rec in records():
        one_by_one += (await fixed.processor.process(0, [rec], now_ms=NOW)).changes
    other = build_services(settings.model_copy(update={
        "partitions": 1, "scoring_mode": "fixed", "namespace": settings.namespace + "b"}))
    try:
        at_once = (await other.processor.process(0, records(), now_ms=NOW)).changes
    finally:
        await other.store.client.aclose()

    def strip(changes):
        return [c.model().model_dump(exclude={"emitted_at"}) for c in changes]
    assert strip(at_once) == strip(one_by_one)
    assert sum(c.cause == "inactivity" for c in at_once) >= 2


async def test_an_idle_partition_stops_holding_the_watermark_back(fixed_2):
    proc = fixed_2.processor
    await proc.process(1, [raw(0, "y", purchase(100, "y", "2024-01-01"), 1)], now_ms=NOW)
    await proc.process(0, [raw(0, "x", purchase(0, "x", "2024-01-01"))], now_ms=NOW)
    # partition 0 moves to day 40 while partition 1 (last seen just now) is still at day 0
    out = await proc.process(0, [raw(1, "a", purchase(1, "a", "2024-02-10"))], now_ms=NOW + 1000)
    assert [c.customer_id for c in out.changes] == ["a"]  # x not yet: the watermark is day 0
    assert (await proc.sweep(1, now_ms=NOW + 2000)).changes == []
    # two minutes later partition 1 is idle: it no longer holds partition 0 back, and its own
    # sweep scores at partition 0's watermark
    later = NOW + 120_000
    out = await proc.process(0, [raw(2, "b", purchase(2, "b", "2024-02-10"))], now_ms=later)
    assert {(c.customer_id, c.cause) for c in out.changes} == {("x", "inactivity"),
                                                               ("b", "purchase")}
    swept = await proc.sweep(1, now_ms=later)
    assert [(c.customer_id, c.cause, c.recency_days) for c in swept.changes] == [
        ("y", "inactivity", 40)]
    assert (await proc.sweep(1, now_ms=later + 1000)).changes == []  # nothing twice


@pytest.mark.parametrize("dwell_s, expected", [
    (86400.0, ["New Customers", "Potential Loyalists"]),
    (0.0, ["New Customers", "Potential Loyalists", "New Customers", "Potential Loyalists"])])
async def test_flapping_guard_holds_refund_changes_for_the_dwell_time(settings, dwell_s, expected):
    s = build_services(settings.model_copy(update={"partitions": 1, "scoring_mode": "fixed",
                                                   "min_dwell_s": dwell_s}))
    rows = [  # two orders -> F2; all of o2 refunded 1 h later -> F1; a third order -> F2
        raw(0, "x", purchase(0, "x", "2024-01-01T00:00:00Z", order="o1")),
        raw(1, "x", purchase(1, "x", "2024-01-01T00:10:00Z", order="o2")),
        raw(2, "x", purchase(2, "x", "2024-01-01T01:00:00Z", order="o2", kind="refund")),
        raw(3, "x", purchase(3, "x", "2024-01-01T02:00:00Z", order="o3")),
    ]
    try:
        changes = []
        for rec in rows:
            changes += (await s.processor.process(0, [rec], now_ms=NOW)).changes
        assert [c.current.segment for c in changes] == expected
        if dwell_s:
            # a held refund change is published when the dwell time ends, with its cause
            refund = [raw(4, "x", purchase(4, "x", "2024-01-01T03:00:00Z", order="o3",
                                           kind="refund"))]
            assert (await s.processor.process(0, refund, now_ms=NOW)).changes == []
            tick = [raw(5, "z", purchase(5, "z", "2024-01-02T00:10:00Z"))]
            late = [c for c in (await s.processor.process(0, tick, now_ms=NOW)).changes
                    if c.customer_id == "x"]
            assert [(c.cause, c.current.segment, c.f_score) for c in late] == [
                ("refund", "New Customers", 1)]
            assert late[0].as_of == datetime(2024, 1, 2, 0, 10, tzinfo=UTC)
    finally:
        await s.store.client.aclose()


@pytest.mark.parametrize("max_due", [1, 2, 10_000])
async def test_a_small_cap_on_due_customers_per_step_changes_nothing(settings, max_due):
    s = build_services(settings.model_copy(update={
        "partitions": 1, "scoring_mode": "fixed", "max_due_per_step": max_due}))
    rows = [raw(i, f"c{i}", purchase(i, f"c{i}", "2024-01-01")) for i in range(5)]
    rows += [raw(5, "z", purchase(5, "z", "2024-04-01"))]  # day 91: all five fall to R3 at once
    try:
        changes = []
        for rec in rows:
            changes += (await s.processor.process(0, [rec], now_ms=NOW)).changes
    finally:
        await s.store.client.aclose()
    assert [(c.customer_id, c.cause, c.current.segment) for c in changes[5:]] == [
        *((f"c{i}", "inactivity", "About To Sleep") for i in range(5)),
        ("z", "purchase", "New Customers")]


@pytest.fixture
async def windowed(settings):
    s = build_services(settings.model_copy(update={
        "partitions": 1, "scoring_mode": "fixed", "window_days": 60, "window_bucket_days": 30}))
    yield s
    await s.store.client.aclose()


async def test_a_window_bucket_leaving_the_window_moves_the_segment_exactly_then(windowed):
    """README "RFM definitions": with ``RFM_WINDOW_DAYS`` frequency and monetary count only
    the window's buckets, and a customer is re-scored when a bucket leaves it. Hand-worked:
    buckets of 30 days from the epoch, so 2024-01-18 (day 19,740 = 658 * 30) starts bucket
    658; a window of 60 days is that bucket and the next, so y's two orders (2024-01-18 and
    01-19, bucket 658) leave it when bucket 660 starts: day 19,800 = 2024-03-18. Before: R5
    (then R4 from 2024-02-19, day 31), F2 (two orders) -> Potential Loyalists both times, so
    no change at day 31; at 2024-03-18: recency 59 days (R4), F 0 -> F1, monetary 0 ->
    Promising, one inactivity change then and not a second earlier."""
    rows = [(0, "y", "2024-01-18"), (1, "y", "2024-01-19"),
            (2, "a", "2024-02-19"),            # y: day 31, R5 -> R4, same segment
            (3, "b", "2024-03-17T23:59:59Z"),  # bucket 658 still inside
            (4, "c", "2024-03-18"),            # bucket 660 starts: 658 leaves
            (5, "d", "2024-03-19")]
    seen = []
    for rec in records(rows):
        out = await windowed.processor.process(0, [rec], now_ms=NOW)
        seen.append([c for c in out.changes if c.customer_id == "y"])
    assert [[c.current.segment for c in cs] for cs in seen] == [
        ["New Customers"], ["Potential Loyalists"], [], [], ["Promising"], []]
    (c,) = seen[4]
    assert (c.cause, c.previous.segment, c.recency_days, c.frequency, c.monetary) == (
        "inactivity", "Potential Loyalists", 59, 0, 0)
    assert (c.r_score, c.f_score, c.m_score) == (4, 1, 1)
    assert c.occurred_at == c.as_of == datetime(2024, 3, 18, tzinfo=UTC)


async def test_wall_clock_mode_scores_at_the_wall_clock_and_sweeps_move_it(settings):
    """RFM_AS_OF_MODE=wall_clock, fixed thresholds (R5 up to 30 days, R4 31-90, R3 91-180),
    by hand: x buys on 2024-01-01 and the step runs 40 days later, so x is scored at 40 days
    (R4, Promising) where the watermark would give 0 (R5, New Customers); with no event, a
    sweep 90 days after the purchase changes nothing, one at 91 days moves x to R3."""
    s = build_services(settings.model_copy(update={"partitions": 1, "scoring_mode": "fixed",
                                                   "as_of_mode": "wall_clock"}))
    try:
        bought = ms("2024-01-01")
        out = await s.processor.process(0, [raw(0, "x", purchase(0, "x", "2024-01-01"))],
                                        now_ms=bought + 40 * DAY)
        (c,) = out.changes
        assert (c.current.segment, c.recency_days, c.r_score, c.cause) == (
            "Promising", 40, 4, "purchase")
        assert c.as_of == datetime(2024, 2, 10, tzinfo=UTC)
        assert (await s.processor.sweep(0, now_ms=bought + 90 * DAY)).changes == []
        (r3,) = (await s.processor.sweep(0, now_ms=bought + 91 * DAY)).changes
        assert (r3.cause, r3.previous.segment, r3.current.segment, r3.recency_days) == (
            "inactivity", "Promising", "About To Sleep", 91)
    finally:
        await s.store.client.aclose()


async def test_rescores_after_a_refresh_are_spaced_in_event_time(settings):
    """RFM_RESCORE_SPACING_MS: the customers a threshold refresh moves are re-scored from its
    anchor, one every spacing ms in id order (the rate limit of cause=rescore). By hand:
    quintile scoring from 5 customers, a refresh every 5 offsets. a..e buy once on days 0..4
    for $10..$50 (fixed thresholds: all New Customers). f's record (offset 5) starts the next
    block: the refresh is anchored at the watermark before it (day 4), where a..e have
    recency 4..0 days (R 1..5: worse = customers with a larger recency), one order each (F1:
    nobody worse) and $10..$50 (M 1..5). So a (1,1,1) and b (2,1,2) become Hibernating,
    c (3,1,3) About To Sleep, d (4,1,4) Promising, and e (5,1,5) stays New Customers: a..d
    are re-scored at the anchor + 0, 1, 2, 3 spacings."""
    spacing = 3_600_000  # an hour of event time
    s = build_services(settings.model_copy(update={
        "partitions": 1, "min_population": 5, "threshold_refresh_every": 5,
        "rescore_spacing_ms": spacing, "min_dwell_s": 0}))
    try:
        days = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"]
        first = [raw(k, cid, purchase(k, cid, day, amount=f"{10 * (k + 1)}.00"))
                 for k, (cid, day) in enumerate(zip("abcde", days, strict=True))]
        assert {c.current.segment for c in
                (await s.processor.process(0, first, now_ms=NOW)).changes} == {"New Customers"}
        out = await s.processor.process(
            0, [raw(5, "f", purchase(5, "f", "2025-02-04"))], now_ms=NOW)
        anchor = ms("2024-01-05")
        got = [(c.customer_id, c.current.segment, int(c.occurred_at.timestamp() * 1000))
               for c in out.changes if c.cause == "rescore"]
        assert got == [("a", "Hibernating", anchor), ("b", "Hibernating", anchor + spacing),
                       ("c", "About To Sleep", anchor + 2 * spacing),
                       ("d", "Promising", anchor + 3 * spacing)]
    finally:
        await s.store.client.aclose()
