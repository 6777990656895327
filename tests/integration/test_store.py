"""The Redis store against a real redis-server: a committed step reads back exactly (every
field, population sets, due times, per-segment counts), a stale writer changes nothing, due
customers are read in order and capped, and order statistics equal brute-force counting."""

from __future__ import annotations

import asyncio
import itertools

import msgpack
import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from state.codec import encode
from state.keys import live_frontier_key
from state.rfm import CustomerState, Limits, StateEvent, Window, apply_event
from state.store import ConflictError, CustomerWrite, OrderStatistics, RedisStore, StoredCustomer
from stream.kafka_io import key_partition

DAY = 86_400_000
_ns = itertools.count()


@pytest.fixture
def redis_url(stack):
    return stack.redis_url


def new_store(url: str) -> RedisStore:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    return RedisStore(client, f"store{next(_ns)}")


def bought(cid: str, last_ms: int, frequency: int = 1, monetary: int = 100,
           limits: Limits = Limits()) -> CustomerWrite:
    """A customer with ``frequency`` orders, the last at ``last_ms``, worth ``monetary``."""
    state = None
    for k in range(frequency):
        state, _ = apply_event(state, StateEvent(f"{cid}-{k}", f"{cid}-o{k}", "purchase",
                                                 monetary if k == 0 else 0, last_ms), limits)
    assert state is not None
    return CustomerWrite(cid, None, StoredCustomer(cid, state),
                         (last_ms, state.frequency, state.monetary_minor))


event = st.builds(
    StateEvent,
    event_id=st.text(min_size=1, max_size=8),  # any text
    order_id=st.sampled_from(["o1", "o2", "ö\"3", "o,4"]),
    kind=st.sampled_from(["purchase", "refund"]),
    amount_minor=st.integers(0, 10**12),
    occurred_ms=st.integers(0, 10**12),
)
stored = st.builds(
    lambda cid, evs, seg, cl, sc, chg: StoredCustomer(cid, _fold(evs), seg, cl, sc, chg),
    st.sampled_from(["c1", "c2", "c:3", "c{4}"]),
    st.lists(event, max_size=8),
    st.one_of(st.none(), st.sampled_from(["Champions", "At Risk", "Hibernating", "Ça «marche»",
                                          "A segment of a table with names over 31 bytes"])),
    st.one_of(st.none(), st.integers(0, 9)),
    st.one_of(st.none(), st.tuples(*[st.integers(1, 5)] * 3)),
    st.one_of(st.none(), st.integers(0, 10**13)),
)


def _fold(events: list[StateEvent]) -> CustomerState:
    s = CustomerState()
    for e in events:
        s, _ = apply_event(s, e, Limits(event_ids=4, order_ids=3), Window(90, 30))
    return s


@given(steps=st.lists(st.lists(st.tuples(stored, st.one_of(st.none(), st.integers(0, 10**13))),
                               min_size=1, max_size=4), min_size=1, max_size=4))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_committed_steps_read_back_exactly(redis_url, steps):
    """Random customers (any id text, windows, orders, published segments) committed over
    several steps: every field, population value, due time and segment count reads back."""
    async def run():
        store = new_store(redis_url)
        expected: dict[str, tuple[StoredCustomer, int | None]] = {}
        try:
            seq = -1
            for step in steps:
                writes = []
                for c, due in step:
                    s = c.state
                    pop = None if s.last_purchase_ms is None else (
                        s.last_purchase_ms, s.frequency, s.monetary_minor)
                    before = expected.get(c.customer_id)
                    writes.append(CustomerWrite(c.customer_id, due, c, pop,
                                                before[0].segment if before else None))
                    expected[c.customer_id] = (c, due)
                seq = await store.commit(0, seq, {"asof": 5}, writes, [])
            back = await store.read_customers(0, list(expected))
            k = store.keys(0)
            segs: dict[str, int] = {}
            for cid, (c, due) in expected.items():
                assert back[cid] == c
                assert await store.client.zscore(k.due, cid) == due
                last = c.state.last_purchase_ms
                assert await store.client.zscore(k.z_last, cid) == last
                if last is not None:
                    assert await store.client.zscore(k.z_mon, cid) == c.state.monetary_minor
                if c.segment:
                    segs[c.segment] = segs.get(c.segment, 0) + 1
            assert await store.segment_counts([0]) == segs
            for cid in expected:  # forget.lua reads the segment of each value it erases
                await store.forget(0, cid)
            assert await store.segment_counts([0]) == {}
        finally:
            await store.client.aclose()
    asyncio.run(run())


async def test_a_stale_writer_changes_nothing(stack):
    store = new_store(stack.redis_url)
    seq = await store.commit(3, -1, {"offset": 12, "wm": 7 * DAY}, [bought("c1", 5 * DAY)],
                             [("c", "{}", "c1"), ("d", '{"x": 1}', None)])
    pattern = f"rfm:{store.namespace}:*"

    async def dump():
        return {k: await store.client.dump(k) for k in sorted(await store.client.keys(pattern))}

    before = await dump()
    with pytest.raises(ConflictError) as exc:  # a writer that read before the first commit
        await store.commit(3, -1, {"offset": 13}, [bought("c1", 9 * DAY)], [("c", "{}", "c1")])
    assert exc.value.stored == seq == 0
    assert await dump() == before
    view = await store.read_partition(3, ["c1", "nobody"], range(4))
    assert view.customers["nobody"] is None and view.customers["c1"] is not None
    assert (view.seq, view.last_offset, view.watermark) == (0, 12, 7 * DAY)
    entries = await store.outbox_read(3)
    assert [e[1:] for e in entries] == [("c", "{}", "c1"), ("d", '{"x": 1}', None)]
    assert await store.outbox_ack(3, [entries[0][0]]) == 1
    assert await store.outbox_depth(range(4)) == 1
    await store.client.aclose()


async def test_the_cache_drops_the_least_recently_committed_customers_of_the_largest_partition(
        stack):
    """Over ``cache_customers``, the oldest commits of the largest partition cache go first.
    Which customers a read takes from the cache shows through values changed in Redis behind
    the store's back (a raw SET keeps the partition's commit token, so cached ones stay)."""
    client = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
    store = RedisStore(client, f"store{next(_ns)}", cache_customers=4)
    due = {"a": None, "b": 20, "c": 30, "e": None}
    writes = [bought(cid, DAY) for cid in "abc"]
    seq0 = await store.commit(0, -1, {}, [w._replace(due_ms=due[w.customer_id])
                                          for w in writes], [])
    await store.commit(1, -1, {}, [bought("d", DAY)], [])
    # a again and e: partition 0 holds b, c, a, e (5 in all): b, committed longest ago, goes
    await store.commit(0, seq0, {}, [bought("a", 2 * DAY), bought("e", DAY)], [])
    for p, cid in [(0, "a"), (0, "b"), (0, "c"), (0, "e"), (1, "d")]:
        await client.set(store.keys(p).customer(cid), encode(bought(cid, 9 * DAY).customer))
    last = {cid: c.state.last_purchase_ms
            for cid, c in (await store.read_customers(0, list("abce"))).items()}
    assert last == {"a": 2 * DAY, "b": 9 * DAY, "c": DAY, "e": DAY}
    assert (await store.read_customer(1, "d")).state.last_purchase_ms == DAY
    # due customers too: c from the cache, b from Redis
    view = await store.read_partition(0, [], [0, 1], hint_ms=100)
    assert [cid for _, cid in view.dues] == ["b", "c"]
    assert {cid: view.customers[cid].state.last_purchase_ms for cid in "bc"} == {
        "b": 9 * DAY, "c": DAY}
    await client.aclose()


async def test_two_reads_that_both_find_the_cache_stale_both_succeed(stack):
    """A forget changes the partition's commit token; two reads that see it at once each drop
    the cache (the second found it dropped already: a KeyError before) and read Redis."""
    client = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
    store = RedisStore(client, f"store{next(_ns)}", cache_customers=10)
    await store.commit(0, -1, {}, [bought("a", DAY)], [])
    await store.forget(0, "zz")
    one, view = await asyncio.gather(store.read_customer(0, "a"),
                                     store.read_partition(0, ["a"], [0]))
    assert one.state.last_purchase_ms == view.customers["a"].state.last_purchase_ms == DAY
    await client.aclose()


async def test_an_outbox_ack_deletes_the_entries_read_and_nothing_else(stack):
    store = new_store(stack.redis_url)
    k = store.keys(0)
    seq = await store.commit(0, -1, {}, [], [("c", f'{{"n": {i}}}', cid)
                                            for i, cid in enumerate(["alice", "bob", "carol"])])
    await store.outbox_claim(0, "me")

    async def keys_left():
        return [(e.kind, e.key) for e in await store.outbox_read(0)]

    read = await store.outbox_read(0, 10, publisher="me")
    await store.forget(0, "bob")  # deletes bob's entry, queues his tombstone
    seq = await store.commit(0, seq + 1, {}, [], [("c", '{"n": 3}', "dave")])
    # alice's and carol's entries go (bob's is gone already); the tombstone and dave's stay
    assert await store.outbox_ack(0, [e.entry_id for e in read], publisher="me") == 2
    assert await keys_left() == [("t", "bob"), ("c", "dave")]

    # the oldest entry read was deleted meanwhile: nothing goes (published again, not lost)
    read = await store.outbox_read(0, 10, publisher="me")
    await store.client.xdel(k.outbox, read[0].entry_id)
    assert await store.outbox_ack(0, [e.entry_id for e in read], publisher="me") == 0
    assert await keys_left() == [("c", "dave")]

    # the stream was lost and made again with smaller ids (a server whose clock is behind)
    read = await store.outbox_read(0, 10, publisher="me")
    await store.client.delete(k.outbox)
    ms = int(read[0].entry_id.split("-")[0])
    await store.client.xadd(k.outbox, {"k": "c", "v": "{}", "key": "erin"}, id=f"{ms - 5000}-0")
    assert await store.outbox_ack(0, [e.entry_id for e in read], publisher="me") == 0
    assert await keys_left() == [("c", "erin")]
    await store.client.aclose()


async def test_due_customers_are_read_in_order_up_to_the_reachable_time_and_capped(stack):
    store = new_store(stack.redis_url)
    writes = [bought(f"c{i}", i * DAY) for i in range(6)]
    dues = {"c0": 50, "c1": 30, "c2": 30, "c3": 70, "c4": 95, "c5": None}
    writes = [CustomerWrite(w.customer_id, dues[w.customer_id], w.customer, w.population)
              for w in writes]
    seq = await store.commit(0, -1, {"wm": 60, "asof": 40}, writes, [])
    view = await store.read_partition(0, [], [0], hint_ms=None)  # reach: max(wm, asof) = 60
    assert view.dues == ((30, "c1"), (30, "c2"), (50, "c0")) and not view.dues_capped
    assert {cid for _, cid in view.dues} == set(view.customers)
    view = await store.read_partition(0, [], [0], hint_ms=80)
    assert [cid for _, cid in view.dues] == ["c1", "c2", "c0", "c3"]
    view = await store.read_partition(0, [], [0], hint_ms=80, max_due=2)
    assert view.dues == ((30, "c1"), (30, "c2")) and view.dues_capped
    # a due-only write keeps the earlier of two due times; '' removes
    await store.commit(0, seq, {}, [CustomerWrite("c3", 90), CustomerWrite("c0", 10),
                                    CustomerWrite("c4", None)], [])
    k = store.keys(0)
    assert (await store.client.zscore(k.due, "c3"), await store.client.zscore(k.due, "c0"),
            await store.client.zscore(k.due, "c4")) == (70, 10, None)
    await store.client.aclose()


async def test_a_customer_written_twice_in_one_commit_keeps_the_order_of_its_writes(stack):
    """commit.lua gathers each kind of command into one variadic call; a customer's second
    write in a commit must still apply after its first (hand-worked: a due-only write keeps
    the earlier due, a full write sets or removes it, the per-segment counts follow both)."""
    store = new_store(stack.redis_url)
    c3, c4 = bought("c3", 3 * DAY), bought("c4", 4 * DAY)
    seg = lambda w, new, old: CustomerWrite(  # noqa: E731
        w.customer_id, w.due_ms, w.customer._replace(segment=new), w.population, old)
    writes = [
        CustomerWrite("c1", 50, bought("c1", DAY).customer, (DAY, 1, 100)),
        CustomerWrite("c1", 30),  # due-only, earlier: 30
        CustomerWrite("c2", 70, bought("c2", 2 * DAY).customer, (2 * DAY, 1, 100)),
        CustomerWrite("c2", 90),  # due-only, later: stays 70
        seg(CustomerWrite("c3", None, c3.customer, c3.population), "A", None),  # no due
        CustomerWrite("c3", 40),  # then a due-only write: 40
        CustomerWrite("c4", 20),  # a due-only write first
        seg(CustomerWrite("c4", 60, c4.customer, None), "A", None),  # then a full one: 60
        seg(CustomerWrite("c4", 60, c4.customer, c4.population), "B", "A"),
    ]
    await store.commit(0, -1, {}, writes, [])
    k = store.keys(0)
    assert [await store.client.zscore(k.due, c) for c in ("c1", "c2", "c3", "c4")] == \
        [30, 70, 40, 60]
    assert await store.client.zscore(k.z_last, "c4") == 4 * DAY  # removed, then added again
    assert await store.segment_counts([0]) == {"A": 1, "B": 1}
    assert (await store.read_customers(0, ["c4"]))["c4"].segment == "B"
    await store.client.aclose()


async def test_a_write_that_keeps_its_population_leaves_the_sorted_sets_alone(stack):
    """``population_kept``: the value, due time and segment count are written, the population
    sorted sets are not (hand-worked: the kept write carries other values, which must not
    land; the same write without the flag lands them)."""
    store = new_store(stack.redis_url)
    a = bought("a", 5 * DAY, monetary=100)
    await store.commit(0, -1, {}, [a, bought("b", 6 * DAY)], [])
    moved = a.customer._replace(segment="S")
    seq = await store.commit(0, 0, {}, [CustomerWrite("a", 40, moved, (9 * DAY, 7, 999), None,
                                                      True)], [])
    k, r = store.keys(0), store.client
    scores = lambda: [r.zscore(key, "a") for key in (k.z_last, k.z_freq, k.z_mon)]  # noqa: E731
    assert [await s for s in scores()] == [5 * DAY, 1, 100]
    assert await r.zscore(k.due, "a") == 40 and await store.segment_counts([0]) == {"S": 1}
    assert (await store.read_customers(0, ["a"]))["a"] == moved
    await store.commit(0, seq, {}, [CustomerWrite("a", 40, moved, (9 * DAY, 7, 999), "S")], [])
    assert [await s for s in scores()] == [9 * DAY, 7, 999]
    await store.client.aclose()


async def test_a_commit_larger_than_a_call_chunk_writes_every_customer(stack):
    """2,501 customers in one commit: more than commit.lua's 1,000 members per call, so its
    variadic calls go in chunks; every value, population entry, due time and count lands."""
    store = new_store(stack.redis_url)
    n = 2_501
    writes = [CustomerWrite(w.customer_id, 1_000 + i, w.customer._replace(segment="S"),
                            w.population)
              for i, w in enumerate(bought(f"c{i}", (i + 1) * DAY, monetary=i) for i in range(n))]
    await store.commit(0, -1, {}, writes, [])
    k, r = store.keys(0), store.client
    assert [await r.zcard(key) for key in (k.z_last, k.z_freq, k.z_mon, k.due)] == [n] * 4
    assert await store.segment_counts([0]) == {"S": n}
    back = await store.read_customers(0, [f"c{i}" for i in range(n)])
    assert all(back[f"c{i}"] == writes[i].customer for i in range(n))
    assert [await r.zscore(k.z_mon, f"c{i}") for i in (0, 999, 1_000, 2_500)] == \
        [0, 999, 1_000, 2_500]
    assert await r.zscore(k.due, "c2500") == 3_500
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
        await store.commit(p, -1, {}, [bought(cid, last, f, mon)
                                       for cid, (pp, last, f, mon) in people.items() if pp == p],
                           [])
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
    ids, values = await store.population_between(0, [("freq", 2, 3), ("mon", 0, 0)])
    assert sorted(ids) == sorted(cid for cid, (p, _, f, m) in people.items()
                                 if p == 0 and (2 <= f <= 3 or m == 0))
    assert [tuple(v) for v in values.tolist()] == [people[c][1:] for c in ids]
    await store.client.aclose()


async def test_order_statistics_match_brute_force_on_wide_random_values(stack):
    """Thousands of customers with values spread over many orders of magnitude (the search
    takes several rounds), over three partitions, at quintile and edge ranks."""
    store = new_store(stack.redis_url)
    rng = np.random.default_rng(7)
    n, as_of = 3_000, 3_000 * DAY
    last = rng.integers(0, as_of + 5 * DAY, n)  # a few after the as-of time (recency 0)
    freq = rng.geometric(0.05, n)
    mon = (10 ** rng.uniform(0, 8, n)).astype(np.int64)
    for p in range(3):
        writes = [CustomerWrite(f"c{i}", None, StoredCustomer(f"c{i}", CustomerState(1)),
                                (int(last[i]), int(freq[i]), int(mon[i])))
                  for i in range(p, n, 3)]
        await store.commit(p, -1, {}, writes, [])
    ranks = (1, 2, 600, 1_200, 1_800, 2_400, 2_999, 3_000)
    stats = await store.order_statistics(range(3), as_of, ranks)
    rec = np.sort(np.maximum(0, (as_of - last) // DAY))[::-1]
    assert stats.recency_kth_largest == tuple(int(rec[k - 1]) for k in ranks)
    assert stats.frequency_kth_smallest == tuple(int(np.sort(freq)[k - 1]) for k in ranks)
    assert stats.monetary_kth_smallest == tuple(int(np.sort(mon)[k - 1]) for k in ranks)
    # a hint only changes where the first round probes: exact, near, far or absurd, the same
    # order statistics come out
    def shifted(by):
        return OrderStatistics(n, *(tuple(v + b for v, b in zip(vals, by[i::3], strict=False))
                                    for i, vals in enumerate((stats.recency_kth_largest,
                                                              stats.frequency_kth_smallest,
                                                              stats.monetary_kth_smallest))))
    for by in ([0] * 24, rng.integers(-40, 40, 24).tolist(), rng.integers(-10**6, 10**6, 24).tolist(),
               [-10**12] * 24, [10**12] * 24):
        again = await store.order_statistics(range(3), as_of, ranks, hint=shifted(by))
        assert again == stats, by
    await store.client.aclose()


def format_2(c: StoredCustomer) -> bytes:
    """The JSON value the store wrote before format 3 (format 2, by its documented fields)."""
    s, sc = c.state, c.scores
    return orjson.dumps([2, c.segment, c.cluster, s.frequency, s.purchases_minor,
                         s.refunds_minor, s.last_purchase_ms, s.first_purchase_ms,
                         list(s.recent_event_ids), [list(o) for o in s.orders],
                         [list(b) for b in s.buckets],
                         None if sc is None else int("".join(map(str, sc))), c.changed_ms,
                         c.held_cause])


async def test_json_values_of_before_format_3_are_read_rewritten_and_forgotten(stack):
    """A namespace written by the JSON formats: its customers read back as they were (their
    ids as digests), a commit rewrites one in format 4 beside the others, and forget uncounts
    the segment of a JSON value as of a MessagePack one."""
    store = new_store(stack.redis_url)
    k = store.keys(0)
    text_ids = Limits(text_ids=True)
    customers = [("a", "Champions"), ("b", "At Risk"), ("c", "Ça «marche»")]
    old, text = ({cid: bought(cid, DAY * (i + 1), i + 1, limits=limits).customer._replace(
        segment=seg, scores=(5, i + 1, 3)) for i, (cid, seg) in enumerate(customers)}
        for limits in (Limits(), text_ids))
    for cid, c in text.items():
        await store.client.set(k.customer(cid), format_2(c))
        await store.client.hincrby(k.segcount, c.segment, 1)
    try:
        assert await store.read_customers(0, "abc") == old
        a2 = bought("a", 9 * DAY).customer._replace(segment="Loyal")
        await store.commit(0, -1, {}, [CustomerWrite("a", None, a2, (9 * DAY, 1, 100),
                                                     "Champions")], [])
        raw = await store.client.execute_command("MGET", *(k.customer(c) for c in "abc"),
                                                 NEVER_DECODE=[])
        assert raw[0][:2] == b"\x9e\x04" and [v[:1] for v in raw[1:]] == [b"[", b"["]
        assert await store.read_customers(0, "abc") == {**old, "a": a2}
        # a store asked to (RFM_STATE_FORMAT=2, a rolling upgrade) writes format 2 again, and
        # reads the customers it writes with their ids as text
        json_writer = RedisStore(store.client, store.namespace, write_format=2)
        assert await json_writer.read_customers(0, "c") == {"c": text["c"]}
        b2 = bought("b", 8 * DAY, limits=text_ids).customer._replace(segment="Loyal",
                                                                       scores=(4, 1, 1))
        await json_writer.commit(0, 0, {}, [CustomerWrite("b", None, b2, (8 * DAY, 1, 100),
                                                          "At Risk")], [])
        assert await store.client.execute_command("GET", k.customer("b"),
                                                  NEVER_DECODE=[]) == format_2(b2)
        for cid in "abc":
            await store.forget(0, cid)
        assert await store.segment_counts([0]) == {}
    finally:
        await store.client.aclose()


async def test_forget_uncounts_only_a_counted_segment_and_counts_survive_fields_not_text(stack):
    """Breaker round 2: forgetting a value written by hand whose segment is not UTF-8
    decremented a new segcount field of those bytes, after which every segment count read
    (/metrics, /segments, `segments`) failed with UnicodeDecodeError."""
    store = new_store(stack.redis_url)
    k = store.keys(0)
    try:
        await store.commit(0, -1, {}, [CustomerWrite("a", None, bought("a", DAY).customer
                                                     ._replace(segment="Loyal"), (DAY, 1, 100))],
                           [])
        junk = msgpack.packb([4, b"\xff\xfe", None, 1, 5, 0, 1, 1, b"", [b"", [], [], []], [],
                              None, None, None], use_bin_type=False)
        await store.client.set(k.customer("x"), junk)
        await store.client.set(k.customer("y"), msgpack.packb(
            [4, "Champions", None, 1, 5, 0, 1, 1, b"", [b"", [], [], []], [], None, None, None],
            use_bin_type=False))  # a segment never counted
        assert (await store.forget(0, "x"))[0] and (await store.forget(0, "y"))[0]
        assert await store.segment_counts([0]) == {"Loyal": 1}
        assert await store.client.hlen(k.segcount) == 1
        await store.client.hset(k.segcount, b"\xff\xfe", 2)  # written by hand
        assert await store.segment_counts([0]) == {"Loyal": 1, "\ufffd\ufffd": 2}
    finally:
        await store.client.aclose()


async def test_workers_exchange_partition_frontiers_and_old_reports_are_left_out(redis_url):
    """Worker A owns partitions 0-1, B owns 2-3: each gets the other's reports (frontier,
    records fetched; infinities included) with the partition's applied offset; a report
    older than the age limit, stamped further ahead than it, a NaN, or not a worker's, is
    left out."""
    a, b = new_store(redis_url), new_store(redis_url)
    b.namespace = a.namespace  # one group, one namespace
    inf = float("inf")
    now = 1_000_000
    assert await a.exchange_frontiers({0: (5.0, 1), 1: (-inf, 0)}, 4, now, 30_000) == {}
    assert await b.exchange_frontiers({2: (inf, 9), 3: (7.5, 2)}, 4, now + 10, 30_000) == \
        {0: (5.0, 1, -1), 1: (-inf, 0, -1)}
    await a.client.hset(a.keys(3).meta, "offset", "41")  # B applied partition 3 up to 41
    assert await a.exchange_frontiers({0: (6.0, 3), 1: (9.0, 4)}, 4, now + 20_000, 30_000) \
        == {2: (inf, 9, -1), 3: (7.5, 2, 41)}
    # B's report is now 30,001 ms old for A; A's 0-1 are fresh for B
    assert await a.exchange_frontiers({0: (6.0, 3), 1: (9.0, 4)}, 4, now + 30_011, 30_000) \
        == {}
    key = live_frontier_key(a.namespace)
    await a.client.hset(key, "2", "not a report")
    assert await b.exchange_frontiers({3: (8.0, 5)}, 4, now + 30_020, 30_000) == \
        {0: (6.0, 3, -1), 1: (9.0, 4, -1)}
    # a NaN, and a stamp further in the future than the age limit (another host's clock)
    await a.client.hset(key, mapping={"0": f"nan {now + 30_000} 3",
                                      "1": f"4.0 {now + 30_020 + 30_001} 4"})
    assert await b.exchange_frontiers({3: (8.0, 5)}, 4, now + 30_020, 30_000) == {}
    await a.client.hset(key, mapping={"0": f"6.0 {now + 30_000} 3", "1": f"9.0 {now + 30_000} 4"})
    # a worker that owns nothing (yet) reads them all: 2's value is not a report
    assert await a.exchange_frontiers({}, 4, now + 30_030, 30_000) == \
        {0: (6.0, 3, -1), 1: (9.0, 4, -1), 3: (8.0, 5, 41)}
    for s in (a, b):
        await s.client.aclose()


async def test_forget_queues_one_tombstone_unless_the_customer_was_in_other_partitions(stack):
    """``rfm-stream forget`` erases in every partition; a tombstone goes to the customer's own
    partition's outbox, and to another's only where the customer had state or entries (a
    fresh user saw four null records on customer-segments for one customer)."""
    from stream.admin import forget_customer
    from stream.settings import Settings

    store = new_store(stack.redis_url)
    s = Settings(redis_url=stack.redis_url, namespace=store.namespace, partitions=4)
    own = key_partition(b"kim", 4)  # Kafka's default partitioner (tests/unit/test_partitioner)
    stray, entry = [p for p in range(4) if p != own][:2]
    await store.commit(own, -1, {}, [bought("kim", DAY)], [])
    await store.commit(stray, -1, {}, [bought("kim", 2 * DAY)], [])  # state where it was keyed
    await store.commit(entry, -1, {}, [], [("c", "{}", "kim")])  # an unpublished change

    async def tombstones() -> dict[int, int]:
        return {p: n for p in range(4)
                if (n := sum(e.kind == "t" for e in await store.outbox_read(p)))}

    assert await forget_customer(s, "kim")
    assert await tombstones() == {own: 1, stray: 1, entry: 1}
    assert not await forget_customer(s, "kim")  # nothing left: one more, in its own only
    assert await tombstones() == {own: 2, stray: 1, entry: 1}
    # the command says so and exits 1 (README "Erasure"); the tombstone is queued all the same
    from click.testing import CliRunner

    from stream.cli import main
    shown = await asyncio.to_thread(CliRunner().invoke, main, ["forget", "kim"], env={
        "RFM_REDIS_URL": stack.redis_url, "RFM_NAMESPACE": store.namespace,
        "RFM_PARTITIONS": "4"})
    assert shown.exit_code == 1 and "kim: not found" in shown.output, shown.output
    assert await tombstones() == {own: 3, stray: 1, entry: 1}
    await store.client.aclose()


async def test_forget_leaves_no_trace_and_a_step_read_before_cannot_write_the_customer_back(
        stack):
    """``forget.lua``'s promises (README "Erasure"): the value, every population sorted set,
    the due set and the segment count lose the customer; unpublished changes and dead
    letters keyed by its id go, other customers' stay; and the partition's commit sequence
    moves, so a step planned from a read before the erasure is refused (ConflictError)."""
    store = new_store(stack.redis_url)
    k = store.keys(0)
    due = bought("ann", 5 * DAY)._replace(due_ms=9 * DAY, previous_segment=None)
    ann = due._replace(customer=due.customer._replace(segment="Champions"))
    seq = await store.commit(0, -1, {}, [ann, bought("bo", 6 * DAY)._replace(due_ms=8 * DAY)],
                             [("c", '{"n": 1}', "ann"), ("d", '{"bad": 1}', "ann"),
                              ("c", '{"n": 2}', "bo"), ("d", '{"bad": 2}', "bo"),
                              ("d", '{"bad": 3}', None)])
    assert await store.segment_counts([0]) == {"Champions": 1}
    view = await store.read_partition(0, ["ann"], [0])  # a step that read ann before
    assert view.seq == seq and view.customers["ann"] is not None
    existed, removed = await store.forget(0, "ann")
    assert (existed, removed) == (True, 2)
    for key in (k.z_last, k.z_freq, k.z_mon, k.due):
        assert await store.client.zscore(key, "ann") is None, key
        assert await store.client.zscore(key, "bo") is not None, key
    assert await store.client.exists(k.customer("ann")) == 0
    assert await store.segment_counts([0]) == {}
    assert [(e.kind, e.key) for e in await store.outbox_read(0)] == [
        ("c", "bo"), ("d", "bo"), ("d", None), ("t", "ann")]
    with pytest.raises(ConflictError):
        await store.commit(0, view.seq, {}, [ann], [("c", '{"n": 3}', "ann")])
    assert await store.client.exists(k.customer("ann")) == 0
    assert await store.client.zscore(k.z_last, "ann") is None
    await store.client.aclose()


async def chunk_members(store: RedisStore, partition: int) -> list[dict[str, float]]:
    """Each chunked population of a partition as read from its chunks directly: id -> value,
    an id found twice kept as a list (none should be)."""
    out = []
    for base in store.keys(partition).chunk_bases:
        members: dict[str, list[float]] = {}
        fences = await store.client.zrange(base + "i", 0, -1)  # '' first
        for f in fences if fences[:1] == [""] else ["", *fences]:
            for cid, v in await store.client.zrange(base + "c:" + f, 0, -1, withscores=True):
                members.setdefault(cid, []).append(v)
        out.append({cid: vs[0] if len(vs) == 1 else vs for cid, vs in members.items()})
    return out


async def test_a_chunked_commit_given_wrong_old_values_still_moves_the_customer(redis_url):
    store = RedisStore(aioredis.Redis.from_url(redis_url, decode_responses=True),
                       f"store{next(_ns)}", population_layout="chunked")
    others = [bought(f"x{i}", i * DAY, 1, 100 + i) for i in range(300)]  # chunks split
    seq = await store.commit(0, -1, {}, [bought("a", 10 * DAY, 1, 100), *others], [])
    moved = bought("a", 20 * DAY, 2, 300)
    # told it was stored at (200 days, 1, 350): last and monetary values whose chunks do not
    # hold it (it is at 10 days and 100), so it is looked for in every chunk and removed there
    assert await store.client.zrange(store.keys(0).chunk_bases[0] + "i", 0, -1) != [""]
    seq = await store.commit(0, seq, {},
                             [moved._replace(previous_population=(200 * DAY, 1, 350))], [])
    last, freq, mon = await chunk_members(store, 0)
    assert (last["a"], freq["a"], mon["a"]) == (20 * DAY, 2, 300)
    assert len(last) == len(freq) == len(mon) == 301
    assert await store.population([0]) == 301
    await store.client.aclose()
