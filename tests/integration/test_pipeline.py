"""The batch processor against a real Redis: hand-worked segments for the first customers
(fixed thresholds), redelivery emits nothing, dead letters don't stop good records."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import date

import msgpack
import pytest
from redis.client import NEVER_DECODE

from stream.pipeline import RawRecord
from stream.services import build_services

DAY_MS = 86_400_000
NOW = 1_800_000_000_000


def purchase(n: int, customer: str, day: str, amount: str = "10.00", order: str | None = None,
             kind: str = "purchase") -> bytes:
    return json.dumps({"event_id": f"e{n}", "customer_id": customer, "order_id": order or f"o{n}",
                       "type": kind, "amount": amount, "currency": "USD",
                       "occurred_at": f"{day}T00:00:00Z"}).encode()


def raw(offset: int, customer: str | None, value: bytes, partition: int = 0) -> RawRecord:
    return RawRecord("purchases", partition, offset, None if customer is None else customer.encode(),
                     value)


@pytest.fixture
async def services(settings):
    s = build_services(settings.model_copy(update={"partitions": 1}))
    yield s
    await s.store.client.aclose()


async def test_first_customers_use_fixed_thresholds_and_changes_are_emitted_once(services):
    proc = services.processor
    batch = [raw(0, "alice", purchase(0, "alice", "2024-03-01", "12.00")),
             raw(1, "bob", purchase(1, "bob", "2024-01-01", "600.00")),
             raw(2, "bob", purchase(2, "bob", "2024-01-01", "1.00", order="o1"))]  # 2nd line of o1
    out = await proc.process(0, batch, now_ms=NOW)
    # watermark = 2024-03-01. alice: 0 days, F1, $12 -> R5 F1 M1 = New Customers.
    # bob: 60 days (31..90 -> R4), F1, $600 -> M5 = Promising, at his first line; the second
    # line of the same order ($1) changes neither frequency nor segment: no second change.
    got = {c.customer_id: c for c in out.changes}
    assert set(got) == {"alice", "bob"}
    a, b = got["alice"], got["bob"]
    assert (a.r_score, a.f_score, a.m_score, a.current.segment) == (5, 1, 1, "New Customers")
    assert (b.recency_days, b.frequency, str(b.monetary)) == (60, 1, "600.00")
    assert len(out.changes) == 2
    bob = await services.store.read_customer(0, "bob")
    assert (bob.state.frequency, bob.state.monetary_minor) == (1, 60100)
    assert (b.r_score, b.f_score, b.m_score, b.current.segment) == (4, 1, 5, "Promising")
    assert a.previous is None and a.thresholds_version == "fixed" and a.current.cluster is None
    assert a.cause == "purchase" and a.cause_event_id == "e0"
    assert "second purchase" in a.strategy

    again = await proc.process(0, batch, now_ms=NOW)  # a redelivery of the same batch
    assert again.changes == [] and again.applied == 0 and again.duplicates == 3

    # alice buys again 10 days later: F2 -> Potential Loyalists; bob is now 70 days: still R4
    out2 = await proc.process(0, [raw(3, "alice", purchase(3, "alice", "2024-03-11"))], now_ms=NOW)
    (c,) = out2.changes
    assert (c.customer_id, c.previous.segment, c.current.segment) == (
        "alice", "New Customers", "Potential Loyalists")
    stored = await services.store.segment_counts([0])
    assert stored == {"Potential Loyalists": 1, "Promising": 1}


async def test_dead_letters_do_not_stop_good_records(services):
    batch = [raw(0, "c1", b"{oops"),
             raw(1, "c2", json.dumps({"event_id": "x", "order_id": "o", "type": "purchase",
                                      "amount": "1.00", "currency": "USD",
                                      "occurred_at": "2024-01-01T00:00:00Z"}).encode()),
             raw(2, "c3", purchase(2, "c3", "2024-01-01", "-5.00")),
             raw(3, "c4", purchase(3, "c4", "2024-01-01"))]
    out = await services.processor.process(0, batch, now_ms=NOW)
    assert [(d.source_offset, d.reason) for d in out.dead_letters] == [
        (0, "not_json"), (1, "missing_field"), (2, "invalid_amount")]
    assert out.dead_letters[0].value == "{oops" and out.dead_letters[0].source_topic == "purchases"
    assert [c.customer_id for c in out.changes] == ["c4"]
    again = await services.processor.process(0, batch, now_ms=NOW)
    assert again.dead_letters == []  # a redelivered dead letter is not sent twice
    assert again.duplicates == 4  # ... and counted as a redelivered record, like c4's
    skipped = services.metrics.registry.get_sample_value(
        f"{services.settings.metrics_prefix}_duplicates_skipped_total", {"kind": "offset"})
    assert skipped == 4
    meta = await services.store.partition_meta([0])
    assert meta[0][0] == 3


async def test_redis_losing_writes_between_blocks_of_one_batch_is_a_gap(services):
    """A batch that straddles a threshold block is committed in two steps; if Redis loses the
    first step's writes in between, the second step must not be applied over the hole."""
    from stream.pipeline import GapError

    proc = services.processor
    k = services.settings.threshold_refresh_every
    batch = [raw(o, "c", purchase(o, "c", "2024-01-01")) for o in range(k - 2, k + 2)]
    real_commit = services.store.commit
    calls = []

    async def commit_then_lose(*args, **kwargs):
        out = await real_commit(*args, **kwargs)
        calls.append(args[1])
        if len(calls) == 1:
            await services.store.client.flushall()
        return out

    services.store.commit = commit_then_lose
    with pytest.raises(GapError) as exc:
        await proc.process(0, batch, now_ms=NOW, check_gap=False)
    assert (exc.value.expected, exc.value.got) == (0, k)
    assert len(calls) == 1


async def test_dead_letters_always_fit_in_a_kafka_record(services):
    from stream.pipeline import MAX_DEAD_LETTER_BYTES

    huge = RawRecord("purchases", 0, 7, b"\xff" * 300_000, b"\x01" * 200_000)
    letter = services.processor.dead_letter(huge, "key_mismatch", "x" * 50_000, NOW)
    assert len(letter.model_dump_json()) <= MAX_DEAD_LETTER_BYTES
    assert letter.value_truncated and "300000 bytes" in letter.detail
    assert letter.source_offset == 7 and letter.key_encoding == "base64"


async def test_after_threshold_refreshes_every_segment_is_what_the_current_thresholds_give(
        settings):
    """Quintile thresholds refreshed every 100 offsets move bounds under customers who bought
    nothing since; the refresh must re-score exactly those. Oracle: each customer's last
    purchase, orders and spend summed from the raw events (not the fold), scored with the
    thresholds in force at the end and looked up in the segment table."""
    import random
    from datetime import UTC, datetime, timedelta

    from state.rfm import recency_days

    s = build_services(settings.model_copy(update={
        "partitions": 1, "threshold_refresh_every": 100, "min_dwell_s": 0,
        "rescore_spacing_ms": 0}))
    rng = random.Random(7)
    start = datetime(2023, 1, 1, tzinfo=UTC)
    values: dict[str, tuple[int, int, int]] = {}  # customer -> (last ms, orders, cents)
    batch = []
    for n in range(3000):
        c = f"c{rng.randrange(400)}"
        at = start + timedelta(days=n * 400 / 3000)
        cents = rng.randrange(100, 30_000)
        batch.append(raw(n, c, json.dumps({
            "event_id": f"e{n}", "customer_id": c, "order_id": f"o{n}", "type": "purchase",
            "amount": f"{cents / 100:.2f}", "currency": "USD",
            "occurred_at": at.isoformat()}).encode()))
        last, orders, spend = values.get(c, (0, 0, 0))
        values[c] = (max(last, int(at.timestamp() * 1000)), orders + 1, spend + cents)
    try:
        rescored = 0
        for i in range(0, len(batch), 250):
            result = await s.processor.process(0, batch[i:i + 250], now_ms=NOW)
            rescored += sum(1 for c in result.changes if c.cause == "rescore")
        t = await s.processor.current_thresholds(0)
        assert t.anchor_ms is not None and rescored > 100, (t, rescored)
        # what scored: quintiles of the 400 customers at the anchor, in UTC as the events' times
        what = re.fullmatch(r"q(\d+)@(\d{4}-\d\d-\d\dT[\d:.]+Z)", t.version)
        assert what and 100 <= int(what[1]) <= 400, t.version
        assert datetime.fromisoformat(what[2]) == datetime.fromtimestamp(t.anchor_ms / 1000, UTC)
        # the bounds themselves, from the raw events applied by the anchor (event times rise
        # with the offsets): the k-th largest recency and k-th smallest orders and spend of
        # that population, k = ceil(j * N / 5)
        at_anchor: dict[str, tuple[int, int, int]] = {}
        for rec in batch:
            event = json.loads(rec.value)
            t_ms = int(datetime.fromisoformat(event["occurred_at"]).timestamp() * 1000)
            if t_ms <= t.anchor_ms:
                last, orders, spend = at_anchor.get(event["customer_id"], (0, 0, 0))
                at_anchor[event["customer_id"]] = (
                    max(last, t_ms), orders + 1, spend + round(float(event["amount"]) * 100))
        pop = len(at_anchor)
        assert pop == int(what[1])
        ks = [-(-j * pop // 5) for j in range(1, 5)]
        days = sorted((recency_days(v[0], t.anchor_ms) for v in at_anchor.values()),
                      reverse=True)
        orders = sorted(v[1] for v in at_anchor.values())
        spend = sorted(v[2] for v in at_anchor.values())
        assert list(t.r_below) == [days[k - 1] for k in ks]
        assert list(t.f_above) == [orders[k - 1] for k in ks]
        assert list(t.m_above) == [spend[k - 1] for k in ks]
        table = s.processor.table
        wrong = []
        async for page in s.store.iter_customers(0):
            for stored in page:
                last, f, m = values[stored.customer_id]
                want = table.lookup(*t.score(recency_days(last, t.anchor_ms), f, m)).name
                if stored.segment != want:
                    wrong.append((stored.customer_id, stored.segment, want))
        assert len(values) == 400 and not wrong, wrong[:5]
    finally:
        await s.store.client.aclose()


async def test_a_population_that_falls_below_the_minimum_is_rescored_with_fixed_thresholds(
        settings):
    """Ten customers make quintiles (min_population 10); forgetting one makes the next refresh
    fall back to the fixed thresholds, and every customer must then hold the segment the fixed
    thresholds give at the as-of time (a breaker's finding: they kept their quintile segments).
    Oracle by hand from the raw events: one order each, bought 40 days apart."""
    from datetime import UTC, datetime, timedelta

    from state.rfm import recency_days

    s = build_services(settings.model_copy(update={
        "partitions": 1, "threshold_refresh_every": 1, "min_population": 10, "min_dwell_s": 0,
        "rescore_spacing_ms": 0}))
    start = datetime(2024, 1, 1, tzinfo=UTC)
    values = {}  # customer -> (last purchase ms, orders, cents)
    records = []
    for n in range(10):
        at = start + timedelta(days=40 * n)
        cents = 3000 + 3000 * n
        records.append(raw(n, f"c{n}", json.dumps({
            "event_id": f"e{n}", "customer_id": f"c{n}", "order_id": f"o{n}",
            "type": "purchase", "amount": f"{cents / 100:.2f}", "currency": "USD",
            "occurred_at": at.isoformat()}).encode()))
        values[f"c{n}"] = (int(at.timestamp() * 1000), 1, cents)
    last_day = start + timedelta(days=40 * 9)
    for n in range(10, 13):  # c9 buys again the same day (1 order each time)
        records.append(raw(n, "c9", purchase(n, "c9", last_day.date().isoformat(), "1.00")))
    try:
        await s.processor.process(0, records, now_ms=NOW)
        assert (await s.processor.current_thresholds(0)).anchor_ms is not None  # quintiles
        assert (await s.store.forget(0, "c5"))[0]
        del values["c5"]
        more = [raw(n, "c9", purchase(n, "c9", last_day.date().isoformat(), "1.00"))
                for n in (13, 14)]
        await s.processor.process(0, more, now_ms=NOW)
        t = await s.processor.current_thresholds(0)
        assert t.version == "fixed", t
        as_of = (await s.store.as_of([0]))
        fixed = s.settings.fixed_thresholds()
        table = s.processor.table
        wrong = []
        async for page in s.store.iter_customers(0):
            for stored in page:
                last, f, m = values[stored.customer_id]
                if stored.customer_id == "c9":
                    f, m = 6, m + 500  # five more one-dollar orders
                want = table.lookup(fixed.r(recency_days(last, as_of)), fixed.f(f),
                                    fixed.m(m)).name
                if stored.segment != want:
                    wrong.append((stored.customer_id, stored.segment, want))
        assert not wrong, wrong
    finally:
        await s.store.client.aclose()


@pytest.mark.parametrize("bad", [
    b"\x9e\x03 not MessagePack",
    b'[2,"Champions",null,1,100,0,"abc",0,[],[],[],555,null,null]'])  # last purchase: text
async def test_an_unreadable_due_customer_stops_neither_the_step_nor_other_customers(settings,
                                                                                      bad):
    """A due customer whose stored value cannot be decoded (written by hand, or by a bug) is
    read by every step of its partition: the step drops its due time and applies the other
    customers' records; its value stays, and its own record still fails (the worker then
    dead-letters it as processing_error). No customer cache: a worker's own cache would hide
    the outside write until its next restart."""
    services = build_services(settings.model_copy(update={"partitions": 1, "cache_customers": 0}))
    proc, store = services.processor, services.store
    try:
        await proc.process(0, [raw(0, "alice", purchase(0, "alice", "2024-01-01"))], now_ms=NOW)
        k = store.keys(0)
        assert await store.client.zscore(k.due, "alice") is not None  # her R moves at a bound
        await store.client.set(k.customer("alice"), bad)
        out = await proc.process(0, [raw(1, "bob", purchase(1, "bob", "2025-06-01"))], now_ms=NOW)
        assert (out.applied, out.dead_letters) == (1, [])
        assert (await store.read_customer(0, "bob")).state.frequency == 1
        assert await store.client.zscore(k.due, "alice") is None
        assert await store.client.execute_command("GET", k.customer("alice"),
                                                  NEVER_DECODE=[]) == bad
        with pytest.raises(ValueError, match="alice"):
            await proc.process(0, [raw(2, "alice", purchase(2, "alice", "2025-07-01"))], now_ms=NOW)
    finally:
        await store.client.aclose()


async def test_a_new_segment_rule_table_rescores_every_customer_once(settings, tmp_path):
    """Customers keep the segment they were last published with until something re-scores
    them: after an edit of the rule table (``RFM_SEGMENT_TABLE``) that was their next event
    or due time, or never, so /segments mixed the old table's names with the new one's for
    good. A table whose cells map elsewhere re-scores every customer once (``cause =
    rescore``), at once: the flapping guard holds a re-score inside its dwell time, and
    switching back held every customer that had just changed (a fresh user's finding: for
    good, with no event moving event time on). Back to the first table, every customer is
    back in the segment it had (the first run's changes are the oracle), and back at the
    second table, in it again; a namespace that recorded no table (written by a release
    before this one) records it without a re-score."""
    everyone = tmp_path / "everyone.toml"
    everyone.write_text('version = "one"\n[[segment]]\nname = "Everyone"\n'
                        'strategy = "Say hello"\nrules = [{}]\n')
    base = settings.model_copy(update={"partitions": 1, "cache_customers": 0})  # 1-day dwell
    workers = [build_services(base),
               build_services(base.model_copy(update={"segment_table": str(everyone)})),
               build_services(base),
               build_services(base.model_copy(update={"segment_table": str(everyone)}))]
    try:
        records = [raw(n, f"c{n}", purchase(n, f"c{n}", f"2024-0{1 + n % 3}-0{1 + n}",
                                            f"{10 * (n + 1)}.00")) for n in range(6)]
        out = await workers[0].processor.process(0, records, now_ms=NOW)
        original = {c.customer_id: c.current.segment for c in out.changes}
        assert len(original) == 6 and "Everyone" not in original.values()

        swept = await workers[1].processor.sweep(0, now_ms=NOW)
        assert {c.customer_id: (c.previous.segment, c.current.segment, c.cause)
                for c in swept.changes} == {cid: (seg, "Everyone", "rescore")
                                            for cid, seg in original.items()}
        assert await workers[1].store.segment_counts([0]) == {"Everyone": 6}
        assert (await workers[1].processor.sweep(0, now_ms=NOW)).changes == []  # recorded

        back = await workers[2].processor.sweep(0, now_ms=NOW)
        assert {c.customer_id: c.current.segment for c in back.changes} == original
        # the partition back at the second worker, which re-scored it before (a breaker's
        # finding: it remembered that and recorded its table without re-scoring)
        again = await workers[1].processor.sweep(0, now_ms=NOW)
        assert {c.customer_id: c.current.segment for c in again.changes} == dict.fromkeys(
            original, "Everyone")
        # the same transitions at the same as-of time as the first switch, but new changes:
        # consumers de-duplicate by change_id (a breaker's finding: the ids were the same)
        assert not {c.change_id for c in again.changes} & {c.change_id for c in swept.changes}

        meta = workers[3].store.keys(0).meta
        await workers[3].store.client.hdel(meta, "rules")  # as a release before this one left it
        assert (await workers[3].processor.sweep(0, now_ms=NOW)).changes == []
        assert (await workers[3].store.client.hget(meta, "rules")).split()[0] == \
            workers[3].processor.table.rules_digest
        assert await workers[3].store.segment_counts([0]) == {"Everyone": 6}
    finally:
        for w in workers:
            await w.store.client.aclose()


@pytest.mark.parametrize("written", ["{digest} --5", "{digest} \u00b2", "{digest}", "junk"])
async def test_a_rules_field_written_by_hand_stops_nothing(services, written):
    """A breaker's case: a partition's meta ``rules`` with the table's digest and a sequence
    that is no integer raised at every step (the worker would exit 70 at every restart). A
    malformed value with the digest is written again; another value re-scores everyone (the
    table it names is unknown) and is replaced."""
    proc, store = services.processor, services.store
    meta = store.keys(0).meta
    await proc.process(0, [raw(0, "a", purchase(0, "a", "2024-01-01"))], now_ms=NOW)
    digest = proc.table.rules_digest
    await store.client.hset(meta, "rules", written.format(digest=digest))
    out = await proc.process(0, [raw(1, "b", purchase(1, "b", "2024-01-02"))], now_ms=NOW)
    assert out.applied == 1
    stored, _, since = (await store.client.hget(meta, "rules")).partition(" ")
    assert stored == digest and int(since) >= 0


@pytest.mark.parametrize("bad", [b"", b"\x9e\x03 not MessagePack", "hash"])
async def test_an_unreadable_customer_to_rescore_stops_neither_the_step_nor_the_others(settings,
                                                                                       bad, caplog):
    """A breaker's case: a customer whose stored value cannot be decoded was read, and raised,
    when a threshold refresh re-scored it; the step failed, then each record alone, and the
    worker exited (70) at every restart, its whole partition stuck. Ten one-order customers
    make quintiles (min_population 10); forgetting one makes the next refresh re-score them
    all with the fixed thresholds. Now the unreadable one is left as it is and the others are
    re-scored (oracle by hand: 40 days apart, the fixed recency bounds 30/90/180/365 days).
    A key of another Redis type (a hash written by hand; ``MGET`` answers nil as for an erased
    customer) is logged the same way (it was skipped without a word)."""
    from datetime import UTC, datetime, timedelta


    s = build_services(settings.model_copy(update={
        "partitions": 1, "threshold_refresh_every": 1, "min_population": 10, "min_dwell_s": 0,
        "rescore_spacing_ms": 0, "cache_customers": 0}))
    start = datetime(2024, 1, 1, tzinfo=UTC)
    records = [raw(n, f"c{n}", purchase(n, f"c{n}", (start + timedelta(days=40 * n)).date()
                                        .isoformat())) for n in range(10)]
    day360 = (start + timedelta(days=360)).date().isoformat()
    records += [raw(n, "c9", purchase(n, "c9", day360, order="o9")) for n in (10, 11)]
    try:
        await s.processor.process(0, records, now_ms=NOW)
        assert (await s.processor.current_thresholds(0)).anchor_ms is not None  # quintiles
        k = s.store.keys(0)
        if bad == "hash":
            await s.store.client.delete(k.customer("c3"))
            await s.store.client.hset(k.customer("c3"), "f", "3")
        else:
            await s.store.client.set(k.customer("c3"), bad)
        assert (await s.store.forget(0, "c5"))[0]
        caplog.clear()
        out = await s.processor.process(
            0, [raw(12, "c9", purchase(12, "c9", day360, order="o9"))], now_ms=NOW)
        assert (out.applied, out.dead_letters) == (1, [])
        assert (await s.processor.current_thresholds(0)).version == "fixed"
        if bad == "hash":
            assert await s.store.client.type(k.customer("c3")) == "hash"
        else:
            assert await s.store.client.execute_command("GET", k.customer("c3"),
                                                        NEVER_DECODE=[]) == bad
        assert any("'c3' has an unreadable stored value" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        # as-of: day 360; c0 bought on day 0 (360 days before: R = 2), c8 on day 320 (R = 4)
        c0, c8 = (await s.store.read_customers(0, ["c0", "c8"])).values()
        assert c0.scores[0] == 2 and c8.scores[0] == 4, (c0.scores, c8.scores)
    finally:
        await s.store.client.aclose()


async def test_a_customer_key_of_another_type_is_not_overwritten_as_a_new_customer(settings):
    """A breaker's case: a customer key holding a hash (written by hand) was read as a new
    customer (MGET answers nil for it) and overwritten: frequency back to 1, a change with no
    previous segment, the segment counted twice. Now the customer's own record fails (the
    worker dead-letters it as processing_error) and the key stays as it is."""
    services = build_services(settings.model_copy(update={"partitions": 1, "cache_customers": 0}))
    proc, store = services.processor, services.store
    try:
        await proc.process(0, [raw(0, "alice", purchase(0, "alice", "2024-01-01"))], now_ms=NOW)
        k = store.keys(0)
        await store.client.delete(k.customer("alice"))
        await store.client.hset(k.customer("alice"), "f", "3")
        with pytest.raises(ValueError, match="alice.*hash"):
            await proc.process(0, [raw(1, "alice", purchase(1, "alice", "2024-02-01"))],
                               now_ms=NOW)
        assert await store.client.type(k.customer("alice")) == "hash"
        out = await proc.process(0, [raw(1, "bob", purchase(1, "bob", "2024-02-01"))],
                                 now_ms=NOW)  # a new customer is still new
        assert out.applied == 1 and (await store.read_customer(0, "bob")).state.frequency == 1
    finally:
        await store.client.aclose()


async def test_a_worker_writing_format_3_keeps_ids_as_text_and_format_4_customers_as_they_are(
        settings):
    """A rolling upgrade (RFM_STATE_FORMAT=3, README "Upgrading"): the new workers write what
    the old ones read, format 3 with ids as text, and de-duplicate with workers of format 4;
    a customer a worker of format 4 already wrote stays in format 4 (its digests have no text
    form). A breaker's case: such customers were unreadable for the format-3 worker, which
    dropped their due times (segments never re-scored) and dead-lettered their events."""
    base = settings.model_copy(update={"partitions": 1, "cache_customers": 0})
    old, new = build_services(base.model_copy(update={"state_format": 3})), build_services(base)
    k = old.store.keys(0)

    async def stored() -> list:
        value = await old.store.client.execute_command("GET", k.customer("alice"),
                                                       **{NEVER_DECODE: []})
        return msgpack.unpackb(value, raw=True)

    try:
        e0 = purchase(0, "alice", "2024-01-01")
        await old.processor.process(0, [raw(0, "alice", e0)], now_ms=NOW)
        day = (date(2024, 1, 1) - date(1970, 1, 1)).days
        assert (await stored())[0] == 3 and (await stored())[8:10] == [[b"e0"],
                                                                       [[b"o0", 1000, 0, day]]]
        again = await old.processor.process(0, [raw(1, "alice", e0)], now_ms=NOW)
        assert (again.applied, again.duplicates) == (0, 1)
        again = await new.processor.process(0, [raw(2, "alice", e0)], now_ms=NOW)
        assert (again.applied, again.duplicates) == (0, 1)  # format 3's text ids, converted
        e3 = purchase(3, "alice", "2024-02-01")
        out = await new.processor.process(0, [raw(3, "alice", e3)], now_ms=NOW)
        assert out.applied == 1 and (await stored())[0] == 4
        again = await old.processor.process(0, [raw(4, "alice", e3)], now_ms=NOW)
        assert (again.applied, again.duplicates) == (0, 1)  # the format-3 worker reads it
        e5 = purchase(5, "alice", "2024-03-01")
        out = await old.processor.process(0, [raw(5, "alice", e5)], now_ms=NOW)
        assert out.applied == 1 and out.dead_letters == [] and (await stored())[0] == 4
        alice = await new.store.read_customer(0, "alice")
        assert (alice.state.frequency, alice.state.monetary_minor) == (3, 3000)
    finally:
        await old.store.client.aclose()
        await new.store.client.aclose()


async def test_a_step_that_waited_for_its_partition_stamps_when_it_ran(services):
    """``emitted_at`` is the wall clock of the step that made the change, read once it holds
    the partition: a breaker found changes stamped seconds before they were made (the batch's
    time, taken before waiting for a sweep of the partition or retrying after a conflict), and
    a customer's later change stamped before its earlier one."""
    proc = services.processor
    lock = proc._locks.setdefault(0, asyncio.Lock())
    await lock.acquire()  # a sweep of partition 0 in progress
    task = asyncio.create_task(proc.process(0, [raw(0, "alice",
                                                    purchase(0, "alice", "2024-03-01"))]))
    await asyncio.sleep(0.3)
    released = time.time()
    lock.release()
    (change,) = (await task).changes
    assert change.emitted_at.timestamp() >= int(released * 1000) / 1000
