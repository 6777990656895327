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
from state.store import Assigned, ConflictError, RedisStore

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
                before = part.last_offset
                part, customers, expected = apply_batch(part, customers, built[i], limits)
                got = await store.commit_batch(0, before, built[i], {}, [])
                assert got == expected
            for cid, state in customers.items():
                stored = await store.read_customer(0, cid)
                assert stored is not None and stored.state == state, cid
            meta = await store.partition_meta([0])
            assert meta[0] == (part.last_offset, part.max_event_ms)
        finally:
            await store.client.aclose()
    asyncio.run(run())


async def test_redelivered_batch_changes_nothing_and_stale_writer_conflicts(stack):
    store = new_store(stack.redis_url)
    recs = [Record(10, "c1", StateEvent("e1", "o1", "purchase", 1234, 5 * DAY)),
            Record(11, "c2", StateEvent("e2", "o2", "purchase", 99, 6 * DAY)),
            Record(12, "c1", StateEvent("e3", "o3", "refund", 34, 7 * DAY))]
    first = await store.commit_batch(3, -1, recs, {"c1": Assigned("Champions", 2)},
                                     [("c", "{}"), ("d", '{"x": 1}')])
    pattern = f"rfm:{store.namespace}:*"

    async def dump():
        return {k: await store.client.dump(k) for k in sorted(await store.client.keys(pattern))}

    before = await dump()
    with pytest.raises(ConflictError) as exc:  # a writer that read before the first commit
        await store.commit_batch(3, -1, recs, {"c1": Assigned("At Risk", None)}, [("c", "{}")])
    assert exc.value.stored == 12
    second = await store.commit_batch(3, 12, recs, {}, [])  # a redelivery
    assert first.applied == 3 and second.applied == 0 and second.duplicate_offsets == 3
    assert await dump() == before
    view = await store.read_partition(3, ["c1", "c2", "nobody"], range(4))
    c1 = view.customers["c1"]
    assert (c1.state.frequency, c1.state.monetary_minor, c1.state.last_purchase_ms) == (
        1, 1200, 5 * DAY)
    assert (c1.segment, c1.cluster) == ("Champions", 2)
    assert view.customers["nobody"] is None and (view.last_offset, view.watermark) == (12, 7 * DAY)
    assert await store.segment_counts(range(4)) == {"Champions": 1}
    entries = await store.outbox_read(3)
    assert [(k, v) for _, k, v in entries] == [("c", "{}"), ("d", '{"x": 1}')]
    assert await store.outbox_ack(3, [entries[0][0]]) == 1
    assert await store.outbox_depth(range(4)) == 1
    await store.client.aclose()


async def test_order_statistics_match_brute_force_across_partitions(stack):
    store = new_store(stack.redis_url)
    as_of = 100 * DAY
    people = {}  # cid -> (partition, last_ms, frequency, monetary)
    for i in range(40):
        last = (i * 7 % 90) * DAY + (i % 3) * 3_600_000
        people[f"c{i}"] = (i % 3, last, 1 + i % 4, (i * 37) % 500)
    people["late"] = (0, as_of + DAY, 1, 0)  # bought after the as-of time: recency 0
    for p in range(3):
        recs, off = [], 0
        for cid, (pp, last, f, mon) in people.items():
            if pp != p:
                continue
            for k in range(f):
                recs.append(Record(off, cid, StateEvent(f"{cid}-{k}", f"{cid}-o{k}", "purchase",
                                                        mon if k == 0 else 0, last)))
                off += 1
        await store.commit_batch(p, -1, recs, {}, [])

    rec = sorted((max(0, (as_of - v[1]) // DAY) for v in people.values()), reverse=True)
    freq = sorted(v[2] for v in people.values())
    mon = sorted(v[3] for v in people.values())
    ranks = (1, 9, 17, 33, 41)
    stats = await store.order_statistics(range(3), as_of, ranks)
    assert stats.population == 41 == await store.population(range(3))
    assert stats.recency_kth_largest == tuple(rec[k - 1] for k in ranks)
    assert stats.frequency_kth_smallest == tuple(freq[k - 1] for k in ranks)
    assert stats.monetary_kth_smallest == tuple(mon[k - 1] for k in ranks)
    with pytest.raises(ValueError):
        await store.order_statistics(range(3), as_of, (42,))
    await store.client.aclose()


async def test_thresholds_are_compare_and_set(stack):
    store = new_store(stack.redis_url)
    await store.commit_batch(0, -1, [Record(0, "c1", StateEvent("e", "o", "purchase", 1, 1))],
                             {}, [])
    assert await store.save_thresholds(0, 0, "A") is True
    assert await store.save_thresholds(0, -1, "B") is False
    assert await store.thresholds(0) == "A"
    await store.client.aclose()
