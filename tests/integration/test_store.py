"""The Redis store against a real redis-server: the Lua batch update is the twin of the pure
fold (differential test), a redelivered batch changes nothing, and population counts equal
brute-force counting."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from state.rfm import Limits, PartitionState, Record, StateEvent, apply_batch
from state.store import RedisStore, SegmentWrite
from stream.scoring import recency_bound_ms

DAY = 86_400_000
_ns = itertools.count()


@pytest.fixture
def redis_url(stack):
    return stack.redis_url


def new_store(url: str, limits: Limits = Limits(event_ids=4, order_ids=3)) -> RedisStore:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    return RedisStore(client, f"store{next(_ns)}", limits)


event = st.builds(
    StateEvent,
    event_id=st.sampled_from([f"e{i}" for i in range(10)]),
    order_id=st.sampled_from([f"o{i}" for i in range(6)]),
    kind=st.sampled_from(["purchase", "refund"]),
    amount_minor=st.integers(0, 10**12),
    occurred_ms=st.integers(0, 10**13),
)
record = st.tuples(st.sampled_from(["c1", "c2", "c3"]), st.one_of(st.none(), event))
batches = st.lists(st.lists(record, min_size=1, max_size=12), min_size=1, max_size=5)


@given(batches=batches, replay=st.lists(st.integers(0, 4), max_size=3))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_lua_matches_pure_fold(redis_url, batches, replay):
    """Random batches (duplicate ids, refunds, late events, dead letters, small memory limits),
    some batches redelivered: Lua and the pure fold end in identical state."""
    async def run():
        store = new_store(redis_url)
        limits = store.limits
        offset = 0
        built = []
        for batch in batches:
            recs = []
            for cid, ev in batch:
                recs.append(Record(offset, None if ev is None else cid, ev))
                offset += 1
            built.append(recs)
        order = list(range(len(built)))
        order += [i for i in replay if i < len(built)]  # redeliveries after the fact
        part, customers = PartitionState(), {}
        try:
            for i in order:
                part, customers, expected = apply_batch(part, customers, built[i], limits)
                got = await store.apply_batch(0, built[i])
                assert got.outcome == expected
            for cid, state in customers.items():
                stored = await store.read_customer(0, cid)
                assert stored is not None and stored.state == state, cid
            meta = await store.partition_meta([0])
            assert meta[0] == (part.last_offset, part.max_event_ms)
        finally:
            await store.client.aclose()
    asyncio.run(run())


async def test_redelivered_batch_changes_nothing(stack):
    store = new_store(stack.redis_url)
    recs = [Record(10, "c1", StateEvent("e1", "o1", "purchase", 1234, 5 * DAY)),
            Record(11, "c2", StateEvent("e2", "o2", "purchase", 99, 6 * DAY)),
            Record(12, "c1", StateEvent("e3", "o3", "refund", 34, 7 * DAY))]
    first = await store.apply_batch(3, recs)
    pattern = f"rfm:{store.namespace}:*"
    dump1 = {k: await store.client.dump(k) for k in sorted(await store.client.keys(pattern))}
    second = await store.apply_batch(3, recs)
    dump2 = {k: await store.client.dump(k) for k in sorted(await store.client.keys(pattern))}
    assert first.outcome.applied == 3 and second.outcome.applied == 0
    assert second.outcome.duplicate_offsets == 3
    assert dump1 == dump2
    assert second.changed == frozenset()
    c1 = second.customers["c1"].state
    assert (c1.frequency, c1.monetary_minor, c1.last_purchase_ms) == (2 - 1, 1200, 5 * DAY)
    await store.client.aclose()


async def test_population_counts_match_brute_force_across_partitions(stack):
    store = new_store(stack.redis_url)
    as_of = 100 * DAY
    people = {}  # cid -> (partition, last_ms, frequency, monetary)
    for i in range(40):
        last = (i * 7 % 90) * DAY + (i % 3) * 3_600_000
        people[f"c{i}"] = (i % 3, last, 1 + i % 4, (i * 37) % 500)
    for p in range(3):
        recs, off = [], 0
        for cid, (pp, last, f, mon) in people.items():
            if pp != p:
                continue
            for k in range(f):
                recs.append(Record(off, cid, StateEvent(f"{cid}-{k}", f"{cid}-o{k}", "purchase",
                                                        mon if k == 0 else 0, last)))
                off += 1
        await store.apply_batch(p, recs)

    def days(last):
        return (as_of - last) // DAY

    queries, expected = [], []
    for _, last, f, mon in people.values():
        queries.append((recency_bound_ms(days(last), as_of), f, mon))
        expected.append((sum(days(o[1]) > days(last) for o in people.values()),
                         sum(o[2] < f for o in people.values()),
                         sum(o[3] < mon for o in people.values())))
    n, worse = await store.population_counts(range(3), queries)
    assert n == 40
    assert worse == expected
    await store.client.aclose()


async def test_segment_compare_and_set(stack):
    store = new_store(stack.redis_url)
    await store.apply_batch(0, [Record(0, "c1", StateEvent("e", "o", "purchase", 1, 1))])
    ok = await store.set_segments(0, [SegmentWrite("c1", None, None, "Champions", 2)])
    stale = await store.set_segments(0, [SegmentWrite("c1", None, None, "At Risk", None)])
    moved = await store.set_segments(0, [SegmentWrite("c1", "Champions", 2, "At Risk", None)])
    assert (ok, stale, moved) == ([True], [False], [True])
    stored = await store.read_customer(0, "c1")
    assert (stored.segment, stored.cluster) == ("At Risk", None)
    assert await store.segment_counts([0]) == {"At Risk": 1}
    await store.client.aclose()
