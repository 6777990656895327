"""The two population layouts (``RFM_POPULATION_LAYOUT``): ``sorted_sets`` (z:last, z:freq,
z:mon per partition) and ``chunked`` (``state/lua/chunks.lua`` under ``p:last:``, ``p:freq:``,
``p:mon:``) against each other and against the raw events, on a real redis-server.

The same two years of purchases and refunds (ties of values, ids that are prefixes of each
other, multi-line orders, partial and full refunds, redeliveries, late events) go through
the batch processor in both layouts, thresholds refreshed and the model trained often: every
output and stored value must be the same, and so must the population statistics, which must
also be those of the raw events. The populations themselves are read
straight from the keys of each layout and compared with a fold of the raw events written here
(not ``state.rfm``). Then ``forget`` in the chunked layout, the layout a namespace keeps, and
the setting that refuses a window with chunks.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from state.store import LayoutError, RedisStore
from stream.changes import Change
from stream.pipeline import RawRecord
from stream.services import Services, build_services, partition_for
from stream.settings import Settings, explain

DAY_MS = 86_400_000
NOW = 1_800_000_000_000  # the wall clock of every step (2027-01-15): no event is in the future
START = datetime(2023, 1, 1, tzinfo=UTC)
DIMS = ("last", "freq", "mon")
# ids that are prefixes of each other, and ids whose bytes sort apart from their characters
ODD_IDS = ["c", "c1x", "c10-", "é", "c1é"]


# --- the events and their oracle ---------------------------------------------------------------
@dataclass
class Event:
    event_id: str
    customer: str
    order: str
    kind: str
    cents: int
    day: int  # days after START

    @property
    def ms(self) -> int:
        return int((START + timedelta(days=self.day)).timestamp() * 1000)

    def value(self) -> bytes:
        at = (START + timedelta(days=self.day)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps({"event_id": self.event_id, "customer_id": self.customer,
                           "order_id": self.order, "type": self.kind,
                           "amount": f"{self.cents // 100}.{self.cents % 100:02d}",
                           "currency": "USD", "occurred_at": at}).encode()


def history(ids: list[str], n: int, regulars: int, seed: int = 11) -> list[Event]:
    """Events in offset order over ~730 days: every customer's first purchase (spread over
    the first 90% of the events), repeat purchases (mostly by ``regulars`` customers), second
    lines of orders, partial and full refunds of what an order has left, and redeliveries of
    an earlier event, on Sundays; 5% of the purchases are late (1-30 days). At most 25 events
    per customer: every id and order stays remembered (32 each), so the fold below is exact."""
    rng = random.Random(seed)
    newcomers = list(ids)
    rng.shuffle(newcomers)
    loyal = set(rng.sample(ids, regulars))
    amounts = [500, 1000, 1000, 2550, 4000, 9999, 12000]  # ties on purpose
    orders: dict[str, list[list]] = {}  # customer -> [[order id, bought, refunded]]
    sent: dict[str, list[Event]] = {}
    active: list[str] = []  # customers with fewer than 25 events
    active_loyal: list[str] = []
    out: list[Event] = []
    for i in range(n):
        day = i * 730 // n // 7 * 7  # weekly: many customers share a last purchase
        due_new = len(ids) - len(newcomers) < (i + 1) * len(ids) / (0.9 * n)
        if newcomers and (due_new or not active):
            kind = "new"
        else:
            kind = rng.choices(["again", "line", "partial", "full", "redeliver"],
                               [10, 2, 2, 1, 1])[0]
        if kind == "new":
            c = newcomers.pop()
            active.append(c)
            if c in loyal:
                active_loyal.append(c)
        else:
            c = rng.choice(active_loyal if active_loyal and rng.random() < 0.7 else active)
        open_orders = [o for o in orders.get(c, []) if o[1] > o[2]]
        if kind in ("partial", "full") and not open_orders or kind == "line" and not orders.get(c):
            kind = "again"
        if kind == "redeliver":
            out.append(rng.choice(sent[c]))
            continue
        if kind in ("new", "again", "line"):
            cents = rng.choice(amounts)
            late = day - rng.randrange(1, 31) if rng.random() < 0.05 else day
            if kind == "line":
                o = rng.choice(orders[c])
                o[1] += cents
            else:
                o = [f"o{i}", cents, 0]
                orders.setdefault(c, []).append(o)
            e = Event(f"e{i}", c, o[0], "purchase", cents, max(0, late))
        else:
            o = rng.choice(open_orders)
            left = o[1] - o[2]
            cents = left if kind == "full" or left <= 100 else rng.randrange(1, left)
            o[2] += cents
            e = Event(f"e{i}", c, o[0], "refund", cents, day)
        sent.setdefault(c, []).append(e)
        if len(sent[c]) == 25:
            active.remove(c)
            if c in loyal:
                active_loyal.remove(c)
        out.append(e)
    assert not newcomers
    return out


def fold(events: list[Event]) -> dict[str, tuple[int, int, int]]:
    """customer -> (last purchase ms, frequency, monetary cents), by the README's rules worked
    by hand: an event id counts once; frequency is the orders bought and not refunded in full;
    monetary is purchases minus refunds (never below 0); the last purchase is the latest
    purchase time (refunds move nothing)."""
    done: set[str] = set()
    last: dict[str, int] = {}
    money: dict[str, int] = {}
    orders: dict[tuple[str, str], list[int]] = {}  # (customer, order) -> [bought, refunded]
    for e in events:
        if e.event_id in done:
            continue
        done.add(e.event_id)
        o = orders.setdefault((e.customer, e.order), [0, 0])
        if e.kind == "purchase":
            o[0] += e.cents
            money[e.customer] = money.get(e.customer, 0) + e.cents
            last[e.customer] = max(last.get(e.customer, 0), e.ms)
        else:
            o[1] += e.cents
            money[e.customer] = money.get(e.customer, 0) - e.cents
    freq = dict.fromkeys(last, 0)
    for (c, _), (bought, refunded) in orders.items():
        freq[c] += bought > refunded
    return {c: (last[c], freq[c], max(0, money[c])) for c in last}


@dataclass(frozen=True)
class Scenario:
    """A history, the partitions it is keyed over and the scoring settings it runs with."""

    ids: list[str]
    events: list[Event]
    partitions: int
    scoring: dict[str, int]

    def partition(self, customer: str) -> int:
        return partition_for(customer, self.partitions)

    @cached_property
    def oracle(self) -> dict[str, tuple[int, int, int]]:
        return fold(self.events)

    def part(self, p: int) -> dict[str, tuple[int, int, int]]:
        """The oracle's customers of partition ``p``."""
        return {c: v for c, v in self.oracle.items() if self.partition(c) == p}

    def records(self) -> list[list[tuple[int, list[RawRecord]]]]:
        """The events as Kafka records of their customer's partition (murmur2 of the id),
        offsets counted per partition, in rounds of 75 events: ``[[(partition, records)]]``."""
        offsets = [0] * self.partitions
        rounds = []
        for i in range(0, len(self.events), 75):
            parts: dict[int, list[RawRecord]] = {}
            for e in self.events[i:i + 75]:
                p = self.partition(e.customer)
                parts.setdefault(p, []).append(
                    RawRecord("purchases", p, offsets[p], e.customer.encode(), e.value()))
                offsets[p] += 1
            rounds.append(sorted(parts.items()))
        return rounds


_ids = [f"c{k}" for k in range(900)] + ODD_IDS
# two partitions of ~450 customers: chunks split and merge; thresholds refreshed and the model
# trained every 40 offsets
MIXED = Scenario(_ids, history(_ids, 3000, 150), 2, {
    "threshold_refresh_every": 40, "min_population": 30, "cluster_min_customers": 30,
    "train_sample_size": 80, "n_clusters": 4})
_ids = [f"c{k}" for k in range(6000)] + ODD_IDS
# one partition of 6,000 customers: more than 64 chunks, so the chunks' groups split too
MANY = Scenario(_ids, history(_ids, 8000, 300, seed=5), 1, {
    "threshold_refresh_every": 500, "min_population": 50, "cluster_min_customers": 50,
    "train_sample_size": 100, "n_clusters": 4})


# --- reading the layouts straight from their keys ----------------------------------------------
def prefix(namespace: str, p: int) -> str:
    return f"rfm:{namespace}:{{p{p}}}:"


async def chunks(client: aioredis.Redis, base: str) -> list[tuple[str, list[tuple[str, int]]]]:
    """The chunks of one chunked population in index order: ``[(fence, [(id, value)])]``."""
    fences = await client.zrangebylex(base + "i", "-", "+")
    return [(f, [(m, int(s)) for m, s in await client.zrange(base + "c:" + f, 0, -1,
                                                             withscores=True)])
            for f in fences]


async def scan(client: aioredis.Redis, pattern: str) -> set[str]:
    return {k async for k in client.scan_iter(match=pattern, count=1000)}


def glob(text: str) -> str:
    return text.replace("{", "\\{").replace("}", "\\}")


async def chunked_population(client: aioredis.Redis, namespace: str, p: int
                             ) -> tuple[dict[str, tuple[int, int, int]], dict[str, int]]:
    """One partition's chunked populations read chunk by chunk, each checked on the way: no
    id twice, members in (value, id bytes) order across the chunks, at most 127 per chunk, no
    chunk key that the index does not list, sizes (``s``) = ZCARD, the group counts (``gn``,
    ``gc``) summing to the customers and chunks. Returns ``({id: (last, freq, mon)}, {dim:
    (number of chunks, number of groups)})``."""
    values: dict[str, list[int]] = {}
    counts = {}
    first_ids: set[str] = set()
    for d, dim in enumerate(DIMS):
        base = prefix(namespace, p) + f"p:{dim}:"
        layout = await chunks(client, base)
        members = [m for _, ms in layout for m in ms]
        assert len({m for m, _ in members}) == len(members), (dim, "an id in two chunks")
        assert members == sorted(members, key=lambda x: (x[1], x[0].encode())), dim
        assert all(len(ms) <= 127 for _, ms in layout), dim
        listed = {base + "c:" + f for f, ms in layout if ms}
        assert await scan(client, glob(base) + "c:*") == listed, (dim, "orphan chunk keys")
        sizes = await client.hgetall(base + "s")
        assert {f: int(n) for f, n in sizes.items()} == {f: len(ms) for f, ms in layout}, dim
        gn, gc = await client.hgetall(base + "gn"), await client.hgetall(base + "gc")
        assert sum(map(int, gn.values())) == len(members), (dim, gn)
        assert sum(map(int, gc.values())) == len(layout), (dim, gc)
        groups = await client.zrangebylex(base + "g", "-", "+")
        assert set(gn) == set(gc) == set(groups), dim
        assert set(groups) <= {f for f, _ in layout}, dim
        for m, v in members:
            values.setdefault(m, [0, 0, 0])[d] = v
        counts[dim] = (len(layout), len(groups))
        ids = {m for m, _ in members}
        if d:
            assert ids == first_ids, (dim, "the dimensions hold different customers")
        else:
            first_ids = ids
    return {c: (v[0], v[1], v[2]) for c, v in values.items()}, counts


async def sorted_set_population(client: aioredis.Redis, namespace: str, p: int
                                ) -> dict[str, tuple[int, int, int]]:
    got: list[dict[str, int]] = []
    for dim in DIMS:
        pairs = await client.zrange(prefix(namespace, p) + f"z:{dim}", 0, -1, withscores=True)
        got.append({m: int(s) for m, s in pairs})
    assert set(got[0]) == set(got[1]) == set(got[2])
    return {c: (got[0][c], got[1][c], got[2][c]) for c in got[0]}


# --- running the history --------------------------------------------------------------------
@dataclass
class Run:
    services: Services
    namespace: str
    changes: list[tuple[int, dict]]  # (partition, change without emitted_at)
    next_offset: list[int]


def comparable(changes: list[Change], p: int) -> list[tuple[int, dict]]:
    return [(p, {k: v for k, v in c.to_dict().items() if k != "emitted_at"}) for c in changes]


async def run(settings: Settings, layout: str, namespace: str, sc: Scenario) -> Run:
    s = build_services(settings.model_copy(update={
        **sc.scoring, "partitions": sc.partitions, "population_layout": layout,
        "namespace": namespace}))
    changes = []
    ends = [0] * sc.partitions
    for batches in sc.records():
        for p, batch in batches:
            out = await s.processor.process(p, batch, now_ms=NOW)
            assert out.dead_letters == []
            changes += comparable(out.changes, p)
            ends[p] = batch[-1].offset + 1
    for p in range(sc.partitions):  # the customers due by the end
        changes += comparable((await s.processor.sweep(p, now_ms=NOW)).changes, p)
    return Run(s, namespace, changes, ends)


@pytest.fixture
async def chunked(settings) -> AsyncIterator[Run]:
    r = await run(settings, "chunked", settings.namespace, MIXED)
    try:
        yield r
    finally:
        await r.services.store.client.aclose()


# --- 1. the differential test ------------------------------------------------------------------
def values_of(ids: list[str], rows) -> dict[str, tuple[int, ...]]:
    assert len(ids) == len(set(ids)), "an id twice"
    return {c: tuple(int(x) for x in row) for c, row in zip(ids, rows, strict=True)}


@pytest.mark.parametrize("sc", [MIXED, MANY], ids=["two_partitions", "groups_split"])
async def test_both_layouts_emit_and_store_the_same(settings, sc):
    runs = []
    try:
        runs.append(await run(settings, "sorted_sets", settings.namespace, sc))
        runs.append(await run(settings, "chunked", settings.namespace + "c", sc))
        await compare(sc, *runs)
    finally:
        for r in runs:
            await r.services.store.client.aclose()


async def compare(sc: Scenario, a: Run, b: Run) -> None:
    sa, sb = a.services.store, b.services.store
    parts = range(sc.partitions)
    # what happened is worth comparing: refreshes re-scored customers, a model was trained,
    # the chunks split (and their groups, in MANY)
    causes = {c["cause"] for _, c in a.changes}
    assert {"purchase", "refund", "rescore"} <= causes, causes
    assert len(a.changes) > len(sc.ids)
    model = await sa.load_model()
    assert model is not None and json.loads(model)["version"] >= 5
    for p in parts:
        assert json.loads(await sa.thresholds(p))["version"].startswith("q")
        _, counts = await chunked_population(sb.client, b.namespace, p)
        assert min(n for n, _ in counts.values()) > 1, counts
        assert sc is not MANY or max(g for _, g in counts.values()) > 1, counts

    # the changes, in order (the wall-clock emitted_at aside)
    assert len(a.changes) == len(b.changes)
    for x, y in zip(a.changes, b.changes, strict=True):
        assert x == y
    # the customers as stored, the segment counts, the thresholds, the model, the meta
    for cid in sc.ids:
        p = sc.partition(cid)
        x, y = await sa.read_customer(p, cid), await sb.read_customer(p, cid)
        assert x is not None and x == y, cid
    assert await sa.segment_counts(parts) == await sb.segment_counts(parts)
    assert sum((await sa.segment_counts(parts)).values()) == len(sc.ids)
    for p in parts:
        assert await sa.thresholds(p) == await sb.thresholds(p)
        ma = await sa.client.hgetall(prefix(a.namespace, p) + "meta")
        mb = await sb.client.hgetall(prefix(b.namespace, p) + "meta")
        for m in (ma, mb):
            m.pop("tok")  # a random token per commit
        assert ma == mb, p
        due = [await s.client.zrange(prefix(ns, p) + "due", 0, -1, withscores=True)
               for s, ns in ((sa, a.namespace), (sb, b.namespace))]
        assert due[0] == due[1], p
    assert await sa.load_model() == await sb.load_model()

    # the population statistics, against each other and against the oracle
    oracle = sc.oracle
    n = len(oracle)
    assert await sa.population(parts) == await sb.population(parts) == n
    for p in parts:
        assert await sa.population([p]) == await sb.population([p]) == len(sc.part(p))
    as_of = await sa.as_of(parts)
    assert as_of is not None and as_of == await sb.as_of(parts)
    ranks = [1, 2, 17, n // 5, n // 2, n - 1, n]
    for t in (as_of, as_of - 90 * DAY_MS, int(START.timestamp() * 1000) + 400 * DAY_MS):
        x = await sa.order_statistics(parts, t, ranks)
        y = await sb.order_statistics(parts, t, ranks)
        assert x == y, t
        days = sorted((max(0, (t - v[0]) // DAY_MS) for v in oracle.values()), reverse=True)
        freq = sorted(v[1] for v in oracle.values())
        mon = sorted(v[2] for v in oracle.values())
        assert x.population == n
        assert list(x.recency_kth_largest) == [days[k - 1] for k in ranks]
        assert list(x.frequency_kth_smallest) == [freq[k - 1] for k in ranks]
        assert list(x.monetary_kth_smallest) == [mon[k - 1] for k in ranks]
        # warm-started at the other ranks' values: the same exact answer
        shifted = [min(n, k + 3) for k in ranks]
        assert await sa.order_statistics(parts, t, shifted, hint=x) == \
            await sb.order_statistics(parts, t, shifted, hint=x)
    assert (await sb.order_statistics(parts, as_of, lambda m: [m])).population == n

    t0 = int(START.timestamp() * 1000)
    cases = [[("last", t0 + 100 * DAY_MS, t0 + 300 * DAY_MS)],
             [("freq", 2, 3)],
             [("mon", 1000, 2550), ("last", float("-inf"), t0 + 30 * DAY_MS)],
             [("mon", 0, 0)],
             [("freq", 0, 0), ("mon", 12000, float("inf"))],
             [("last", float("-inf"), float("inf"))],
             [("last", t0 + 7 * DAY_MS, t0 + 7 * DAY_MS), ("freq", 1000, 2000)]]
    for p in parts:
        mine = sc.part(p)
        for ranges in cases:
            x = values_of(*await sa.population_between(p, ranges))
            y = values_of(*await sb.population_between(p, ranges))
            want = {c: v for c, v in mine.items()
                    if any(lo <= v[DIMS.index(kind)] <= hi for kind, lo, hi in ranges)}
            assert x == y == want, ranges

    order = [v for p in parts for _, v in sorted(
        sc.part(p).items(), key=lambda cv: (cv[1][0], cv[0].encode()))]
    ranks0 = [0, 1, 5, 126, 127, 128, n // 2, n - 2, n - 1, n, n + 5, 3, 3]
    x, y = await sa.sample_by_rank(parts, ranks0), await sb.sample_by_rank(parts, ranks0)
    assert x == y == [order[r] for r in ranks0 if r < n]

    for p in parts:
        assert await sa.due_all(p, as_of) == await sb.due_all(p, as_of) == len(sc.part(p))
        assert await sa.client.zrange(prefix(a.namespace, p) + "due", 0, -1, withscores=True) == \
            await sb.client.zrange(prefix(b.namespace, p) + "due", 0, -1, withscores=True)
    # each layout wrote its own keys only
    for p in parts:
        assert not await scan(sa.client, glob(prefix(a.namespace, p)) + "p:*")
        assert not await scan(sb.client, glob(prefix(b.namespace, p)) + "z:*")


# --- 2. the populations against the raw events -----------------------------------------------
@pytest.mark.parametrize("layout", ["sorted_sets", "chunked"])
async def test_the_stored_populations_are_the_fold_of_the_raw_events(settings, layout):
    sc = MIXED
    r = await run(settings, layout, settings.namespace, sc)
    client = r.services.store.client
    try:
        for p in range(sc.partitions):
            if layout == "chunked":
                got, counts = await chunked_population(client, r.namespace, p)
                assert min(n for n, _ in counts.values()) > 1, counts
            else:
                got = await sorted_set_population(client, r.namespace, p)
            want = sc.part(p)
            assert len(want) > 127
            wrong = {c: (got.get(c), v) for c, v in want.items() if got.get(c) != v}
            assert got.keys() == want.keys() and not wrong, list(wrong.items())[:5]
        # the oracle is not trivial: orders refunded in full, partial refunds, ties
        assert any(v[1] == 0 for v in sc.oracle.values())
        assert any(v[2] % 100 for v in sc.oracle.values())
        assert len({v[0] for v in sc.oracle.values()}) < len(sc.oracle) / 2
    finally:
        await client.aclose()


# --- 3. forget, chunked -----------------------------------------------------------------------
async def test_forget_removes_a_customer_from_every_chunk(chunked):
    s, ns = chunked.services, chunked.namespace
    client, store = s.store.client, s.store
    mine = MIXED.part(0)
    before, counts = await chunked_population(client, ns, 0)
    assert before == mine and counts["last"][0] > 1
    # a customer in the middle of every dimension (not in the first chunk of recency)
    by_last = sorted(mine, key=lambda c: (mine[c][0], c.encode()))
    cid = by_last[len(by_last) * 2 // 3]
    assert await client.zscore(prefix(ns, 0) + "p:last:c:", cid) is None
    total = await store.population(range(MIXED.partitions))
    existed, _ = await store.forget(0, cid)
    assert existed
    keys = await scan(client, glob(prefix(ns, 0)) + "p:*:c:*")
    assert len(keys) >= 6
    for key in keys:
        assert await client.zscore(key, cid) is None, key
    after, _ = await chunked_population(client, ns, 0)  # sizes and groups still agree
    assert after == {c: v for c, v in mine.items() if c != cid}
    assert await store.population(range(MIXED.partitions)) == total - 1
    assert await store.read_customer(0, cid) is None

    # another customer's purchase still commits, and moves that customer in every chunk
    other = by_last[0]
    offset = chunked.next_offset[0]
    e = Event("late-1", other, "o-late-1", "purchase", 1234, 729)
    out = await s.processor.process(0, [RawRecord("purchases", 0, offset, other.encode(),
                                                  e.value())], now_ms=NOW)
    assert out.applied == 1
    last, f, m = mine[other]
    after, _ = await chunked_population(client, ns, 0)
    assert after[other] == (max(last, e.ms), f + 1, m + 1234)
    assert cid not in after
    # ... and the forgotten customer comes back as a new one
    e2 = Event("late-2", cid, "o-late-2", "purchase", 700, 729)
    out = await s.processor.process(0, [RawRecord("purchases", 0, offset + 1, cid.encode(),
                                                  e2.value())], now_ms=NOW)
    assert out.applied == 1 and out.changes and out.changes[0].previous is None
    after, _ = await chunked_population(client, ns, 0)
    assert after[cid] == (e2.ms, 1, 700)
    assert await store.population(range(MIXED.partitions)) == total


@pytest.mark.parametrize("layout", ["sorted_sets", "chunked"])
async def test_a_customer_whose_value_was_lost_is_erased_whole(settings, layout):
    """A customer's stored value gone while the populations still hold it (deleted by hand,
    or evicted): its next purchase makes it a new customer. The sorted sets hold it once, at
    its new values (ZADD by id); the chunks, found by value, also keep its old entries, as
    README "Limits" says (counted twice). A later ``forget`` must leave nothing of it in
    either. By hand: c000..c129 buy once, a day apart (recency's chunks split at the 128th:
    c000 is in the first chunk); c000's value is deleted; it buys on day 300 (in the last
    chunk)."""
    s = build_services(settings.model_copy(update={"partitions": 1, "cache_customers": 0,
                                                   "population_layout": layout}))
    client, ns = s.store.client, settings.namespace
    try:
        await s.processor.process(0, [RawRecord(
            "purchases", 0, k, f"c{k:03d}".encode(),
            Event(f"e{k}", f"c{k:03d}", f"o{k}", "purchase", 1000, k).value())
            for k in range(130)], now_ms=NOW)
        if layout == "chunked":
            assert await client.zscore(prefix(ns, 0) + "p:last:c:", "c000") is not None
        await client.delete(prefix(ns, 0) + "c:c000")
        e = Event("e130", "c000", "o130", "purchase", 700, 300)
        out = await s.processor.process(0, [RawRecord("purchases", 0, 130, b"c000", e.value())],
                                        now_ms=NOW)
        assert out.applied == 1
        if layout == "chunked":  # the documented limit: its old entries stay
            assert await s.store.population([0]) == 131
            assert await client.zscore(prefix(ns, 0) + "p:last:c:", "c000") is not None
        else:
            assert await s.store.population([0]) == 130
            got = await sorted_set_population(client, ns, 0)
            assert len(got) == 130 and got["c000"] == (e.ms, 1, 700)
        await s.store.forget(0, "c000")
        for key in await scan(client, glob(prefix(ns, 0)) + "[pz]:*"):
            if await client.type(key) == "zset":
                assert await client.zscore(key, "c000") is None, key
    finally:
        await client.aclose()


# --- due_all, whatever its page -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sorted_sets", "chunked"])
async def test_due_all_makes_everyone_due_whatever_the_page(settings, layout):
    """By hand: c000..c129 buy one a day; the 128th splits recency's first chunk ('') at 64;
    then c000..c063 buy again, 200 days on: they leave the first chunk, empty now (it never
    merges), for the last ones. Every customer is still in the population, and must be made
    due, in pages of any size."""
    s = build_services(settings.model_copy(update={"partitions": 1,
                                                   "population_layout": layout}))
    client = s.store.client
    try:
        buys = [(k, f"c{k:03d}", k) for k in range(130)]
        buys += [(130 + k, f"c{k:03d}", 200 + k) for k in range(64)]
        for n, c, day in buys:  # a step each: a chunk is split as it reaches 128
            out = await s.processor.process(0, [RawRecord(
                "purchases", 0, n, c.encode(),
                Event(f"e{n}", c, f"o{n}", "purchase", 1000, day).value())], now_ms=NOW)
            assert out.applied == 1
        if layout == "chunked":
            first = await client.zcard(prefix(settings.namespace, 0) + "p:last:c:")
            assert first == 0 and len(await chunks(client, prefix(settings.namespace, 0)
                                                   + "p:last:")) > 1
        assert await s.store.population([0]) == 130
        due = prefix(settings.namespace, 0) + "due"
        for page in (10_000, 200, 64, 10, 1):
            await client.delete(due)
            assert await s.store.due_all(0, NOW, page=page) == 130, page
            assert await client.zcard(due) == 130, page
    finally:
        await client.aclose()


# --- 4. a namespace keeps its layout -----------------------------------------------------------
def one_purchase(customer: str, offset: int, partition: int = 0) -> list[RawRecord]:
    e = Event(f"e{offset}", customer, f"o{offset}", "purchase", 1000, 10)
    return [RawRecord("purchases", partition, offset, customer.encode(), e.value())]


@pytest.mark.parametrize("written,other", [("sorted_sets", "chunked"),
                                           ("chunked", "sorted_sets")])
async def test_a_namespace_refuses_a_store_of_the_other_layout(settings, written, other):
    base = settings.model_copy(update={"partitions": 1})
    s = build_services(base.model_copy(update={"population_layout": written}))
    wrong = build_services(base.model_copy(update={"population_layout": other}))
    client, ns = s.store.client, settings.namespace
    try:
        await s.store.check_layout([0])  # a new namespace takes either (a worker's start)
        out = await s.processor.process(0, one_purchase("a", 0), now_ms=NOW)
        assert out.applied == 1
        await s.store.check_layout([0])  # its own layout, again (a restart)
        with pytest.raises(ValueError) as caught:
            await RedisStore(client, ns, population_layout=other).check_layout([0])
        assert written in str(caught.value) and other in str(caught.value), caught.value
        assert ns in str(caught.value)
        # a worker of the other layout writes nothing
        keys = await scan(client, glob(f"rfm:{ns}:") + "*")
        meta = await client.hgetall(prefix(ns, 0) + "meta")
        with pytest.raises(ValueError):
            await wrong.processor.process(0, one_purchase("b", 1), now_ms=NOW)
        assert await scan(client, glob(f"rfm:{ns}:") + "*") == keys
        assert await client.hgetall(prefix(ns, 0) + "meta") == meta
        # ... and the namespace's own layout goes on
        out = await s.processor.process(0, one_purchase("b", 1), now_ms=NOW)
        assert out.applied == 1 and await s.store.population([0]) == 2
    finally:
        await client.aclose()
        await wrong.store.client.aclose()


async def test_the_worker_command_refuses_the_other_layout_before_it_starts(settings):
    """``rfm-stream worker`` on a namespace written with sorted sets, with
    RFM_POPULATION_LAYOUT=chunked: it exits 1 with the message, before faust starts (else it
    would run until the timeout: the process is then killed and the test fails)."""
    import subprocess
    import sys

    from stream.runner import settings_env

    s = build_services(settings.model_copy(update={"partitions": 1,
                                                   "population_layout": "sorted_sets"}))
    try:
        assert (await s.processor.process(0, one_purchase("a", 0), now_ms=NOW)).applied == 1
    finally:
        await s.store.client.aclose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFM_")}
    env |= settings_env(settings.model_copy(update={"partitions": 1,
                                                    "population_layout": "chunked"}))
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "stream", "worker"],
                                   env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "keeps its populations as sorted_sets, not chunked" in done.stderr
    assert "faust" not in done.stderr.lower().replace("rfm-stream worker", "")


@pytest.mark.parametrize("written", ["sorted_sets", "chunked", None])
async def test_auto_takes_the_namespace_layout_and_chunks_a_new_one(settings, written):
    """RFM_POPULATION_LAYOUT=auto (the default) on a namespace written with either layout
    (None: a new namespace) writes that layout's keys and no other; a new namespace is
    chunked. A chunked one is refused when the store needs a window."""
    base = settings.model_copy(update={"partitions": 1})
    assert base.population_layout == "auto"
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    ns = settings.namespace
    try:
        if written:
            first = build_services(base.model_copy(update={"population_layout": written}))
            assert (await first.processor.process(0, one_purchase("a", 0), now_ms=NOW)).applied
            await first.store.client.aclose()
        auto = build_services(base)
        with pytest.raises(LayoutError, match="not read yet"):
            auto.store.chunked  # noqa: B018 - raises before the layout is read
        out = await auto.processor.process(0, one_purchase("b", 1 if written else 0), now_ms=NOW)
        assert out.applied == 1
        want = written or "chunked"
        assert await auto.store.layout() == want
        assert await client.get(prefix(ns, 0) + "layout") == want
        assert await auto.store.population([0]) == (2 if written else 1)
        chunk_index = prefix(ns, 0) + "p:last:i"
        assert await client.exists(prefix(ns, 0) + "z:last", chunk_index) == 1
        assert await client.exists(chunk_index if want == "chunked"
                                   else prefix(ns, 0) + "z:last") == 1
        await auto.store.client.aclose()
        windowed = RedisStore(client, ns, population_layout="auto", window=True)
        if want == "chunked":
            with pytest.raises(LayoutError, match="window"):
                await windowed.check_layout([0])
        else:
            assert await windowed.layout() == "sorted_sets"
        fresh = RedisStore(client, ns + "w", population_layout="auto", window=True)
        assert await fresh.layout() == "sorted_sets"
    finally:
        await client.aclose()


async def test_a_layout_record_binds_from_the_first_start(settings):
    """A worker started on a new namespace records its layout before it applies anything, and
    a store of another layout is then refused, state or not: two workers of different
    settings starting at once must not each write their own (a breaker mixed the layouts
    when an empty namespace's record could be rewritten). Deleted by hand, the record is set
    again by the next store. A record that is not a string is named, not a Redis error."""
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    ns, key = settings.namespace, prefix(settings.namespace, 0) + "layout"
    try:
        await RedisStore(client, ns, population_layout="auto").check_layout([0, 1])
        assert await client.get(key) == "chunked"
        with pytest.raises(LayoutError, match="window"):
            await RedisStore(client, ns, population_layout="auto", window=True).check_layout(
                [0, 1])
        with pytest.raises(LayoutError, match="keeps its populations as chunked"):
            await RedisStore(client, ns, population_layout="sorted_sets").check_layout([0, 1])
        assert not await scan(client, glob(f"rfm:{ns}:") + "*[pz]:*")
        await client.delete(key)  # README "Upgrading": a namespace with no state yet
        windowed = RedisStore(client, ns, population_layout="auto", window=True)
        assert await windowed.layout() == "sorted_sets" == await client.get(key)
        await client.delete(key)
        await client.hset(key, "layout", "chunked")
        with pytest.raises(LayoutError, match="not a string"):
            await RedisStore(client, ns, population_layout="auto").check_layout([0, 1])
    finally:
        await client.aclose()


async def test_a_chunked_namespace_whose_layout_record_was_lost_is_still_chunked(settings):
    """The record deleted (by hand, a wipe of that key, an eviction): the chunks in any
    partition say which layout the namespace has; both kinds of keys are refused."""
    s = build_services(settings.model_copy(update={"partitions": 2,
                                                   "population_layout": "chunked"}))
    client, ns = s.store.client, settings.namespace
    try:
        assert (await s.processor.process(1, one_purchase("a", 0, 1), now_ms=NOW)).applied == 1
        await client.delete(prefix(ns, 0) + "layout")
        with pytest.raises(ValueError, match="keeps its populations as chunked"):
            await RedisStore(client, ns, population_layout="sorted_sets").check_layout([0, 1])
        await client.delete(prefix(ns, 0) + "layout")
        await client.zadd(prefix(ns, 0) + "z:last", {"b": 1})  # as a sorted_sets worker would
        with pytest.raises(ValueError, match="both layouts"):
            await RedisStore(client, ns, population_layout="chunked").check_layout([0, 1])
    finally:
        await client.aclose()


async def test_a_sample_over_ranks_an_erasure_removed_meanwhile_skips_them(chunked):
    """The trainer's sample reads the population's size, then its ranks: a ``forget`` in
    between leaves fewer ranks than asked for, which are skipped (not an error, which would
    fail the trainer partition's step)."""
    store = chunked.services.store
    n = await store.population([0])
    got = await store._sample_chunked(0, [0, n - 1, n, n + 3])
    assert got[0] is not None and got[1] is not None and got[2:] == [None, None]


async def test_the_sorted_sets_sample_answers_a_rank_an_erasure_removed_with_nothing(settings):
    """The sorted sets' ``sample.lua`` given a rank past the population (an erasure
    between the size read and the sample): false values for it, not an error."""
    s = build_services(settings.model_copy(update={"partitions": 1,
                                                   "population_layout": "sorted_sets"}))
    try:
        assert (await s.processor.process(0, one_purchase("a", 0), now_ms=NOW)).applied == 1
        k = s.store.keys(0)
        got = await s.store._sample(keys=[k.z_last, k.z_freq, k.z_mon], args=[0, 1, 5])
        assert got[3:] == [None] * 6 and None not in got[:3]
    finally:
        await s.store.client.aclose()


async def test_a_layout_record_set_by_hand_to_anything_else_is_named(settings):
    store = RedisStore(aioredis.Redis.from_url(settings.redis_url.get_secret_value(),
                                               decode_responses=True), settings.namespace)
    try:
        await store.client.set(prefix(settings.namespace, 0) + "layout", "chunked ")
        with pytest.raises(ValueError, match="holds 'chunked '"):
            await store.check_layout([0])
    finally:
        await store.client.aclose()


@pytest.mark.parametrize("data_in", [0, 1])
async def test_a_namespace_with_data_and_no_recorded_layout_is_sorted_sets(settings, data_in):
    """As a release before the layouts left it: partition meta keys, no ``layout`` key.
    The data may be in any partition the worker is given (here only in ``data_in``)."""
    s = build_services(settings.model_copy(update={"partitions": 2,
                                                   "population_layout": "sorted_sets"}))
    client, ns = s.store.client, settings.namespace
    try:
        out = await s.processor.process(data_in, one_purchase("a", 0, data_in), now_ms=NOW)
        assert out.applied == 1
        await client.delete(prefix(ns, 0) + "layout")
        assert not await scan(client, glob(f"rfm:{ns}:") + "*layout*")
        assert await client.exists(prefix(ns, data_in) + "meta")
        with pytest.raises(ValueError):
            await RedisStore(client, ns, population_layout="chunked").check_layout([0, 1])
        await RedisStore(client, ns, population_layout="sorted_sets").check_layout([0, 1])
        with pytest.raises(ValueError):  # still, and now recorded or not
            await RedisStore(client, ns, population_layout="chunked").check_layout([0, 1])
        # a namespace with nothing at all takes either
        await RedisStore(client, ns + "e", population_layout="chunked").check_layout([0, 1])
        await RedisStore(client, ns + "f", population_layout="sorted_sets").check_layout([0, 1])
    finally:
        await client.aclose()


# --- 5. the setting ---------------------------------------------------------------------------
def test_the_chunked_layout_refuses_a_window(monkeypatch):
    with pytest.raises(ValidationError) as caught:
        Settings(population_layout="chunked", window_days=30)
    assert "chunked" in str(caught.value) and "RFM_WINDOW_DAYS" in str(caught.value)
    assert Settings(population_layout="chunked").window_days == 0
    assert Settings(window_days=30).population_layout == "auto"  # a window: sorted sets
    monkeypatch.setenv("RFM_POPULATION_LAYOUT", "chunked")
    assert Settings().population_layout == "chunked"
    monkeypatch.setenv("RFM_WINDOW_DAYS", "60")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "chunked" in explain(caught.value)
    monkeypatch.delenv("RFM_WINDOW_DAYS")
    monkeypatch.setenv("RFM_POPULATION_LAYOUT", "chunks")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert explain(caught.value).startswith("RFM_POPULATION_LAYOUT = 'chunks': ")
