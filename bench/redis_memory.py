"""Redis memory per customer: N customers (default 1,000,000) with 8 orders each on average,
written through the store's real commit path, against the 500 bytes/customer target. Prints
figures; asserts nothing.

    .venv/bin/python bench/redis_memory.py [--customers 1000000] [--uuid-ids] [--scoring fixed]
        [--layout sorted_sets]

``--layout``: how the populations are kept (``RFM_POPULATION_LAYOUT``): ``chunked`` (the
default, what a new namespace gets: ``state/lua/chunks.lua``) or ``sorted_sets`` (one sorted
set each: the layout of namespaces written before 2026-12-04, and of those with a window).

Each customer's orders (1 + Poisson(7), so 8 on average; one purchase event per order, times
spread over two years, amounts 5-200 USD) are folded with ``state.rfm.apply_event``, scored
at the end of the two years, given a segment, a cluster and its next due time, and committed
with ``RedisStore.commit`` (``CustomerWrite``), 1,000 customers per commit, over 4 partitions
(the worker's partitioner), into a fresh redis-server from ``stream.localstack``.

Scoring: ``quintiles`` (the worker's default) scores with thresholds anchored at the as-of
time, as quintile thresholds are, so no customer has a due time (time alone moves no one's R:
the ``due`` set stays empty); ``fixed`` with the fixed thresholds, under which every customer
is due when its recency next crosses a bound. Both use the fixed bounds' values (the segments
are alike; only the due times differ).

Then: ``INFO memory`` ``used_memory`` after minus before, per customer, and the part of each
structure (``MEMORY USAGE``: every key of a partition whole, customer values on a sample) per
customer; "unattributed" is what ``used_memory`` grew by beyond them (the keyspace's hash
table buckets, allocator rounding). Ids: order ``pos-<n>``, event ``pos-<n>-1`` (as the
README's example event), or UUIDs with ``--uuid-ids``; the outbox is empty, as it is once the
publisher has drained it. About 2-3 minutes for 1M customers.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import benchkit
import msgpack
import numpy as np
import redis.asyncio as aioredis
from aiokafka.partitioner import murmur2
from redis.client import NEVER_DECODE

from state.keys import PartitionKeys
from state.rfm import MS_PER_DAY, CustomerState, Limits, StateEvent, apply_event
from state.store import CustomerWrite, RedisStore, StoredCustomer
from stream import localstack
from stream.scoring import Thresholds
from stream.segments import SegmentTable
from stream.settings import Settings

TARGET = 500
PARTITIONS = 4
AS_OF = 1_719_792_000_000  # 2024-07-01T00:00:00Z: the as-of time, the end of the two years
SPAN_MS = 730 * MS_PER_DAY


def partition_for(customer_id: str) -> int:
    """The worker's partition of a customer (murmur2, as ``stream.services.partition_for``)."""
    return (murmur2(customer_id.encode()) & 0x7FFFFFFF) % PARTITIONS


def customer_states(n: int, uuid_ids: bool, limits: Limits = Limits()
                    ) -> Iterator[tuple[str, CustomerState]]:
    """The benchmark's ``n`` customers, ``(customer id, state)``: ``1 + Poisson(7)`` orders
    each (one purchase event per order, times spread over the two years before ``AS_OF``,
    amounts 5-200 USD), folded with ``state.rfm.apply_event`` and ``limits`` (ids as text
    for the older value formats). Deterministic (seed 42)."""
    rng = np.random.default_rng(42)
    orders = 1 + rng.poisson(7, n)
    ids = random.Random(42)
    order_no = 0
    for i in range(n):
        k = int(orders[i])
        times = np.sort(rng.integers(AS_OF - SPAN_MS, AS_OF, k))
        amounts = rng.integers(500, 20_000, k)
        state = None
        for t, amount in zip(times.tolist(), amounts.tolist(), strict=True):
            if uuid_ids:
                oid, eid = str(uuid.UUID(int=ids.getrandbits(128), version=4)), \
                    str(uuid.UUID(int=ids.getrandbits(128), version=4))
            else:
                oid = f"pos-{order_no}"
                eid = oid + "-1"
            order_no += 1
            state, _ = apply_event(state, StateEvent(eid, oid, "purchase", amount, t), limits)
        assert state is not None and state.last_purchase_ms is not None
        yield f"c{i:07d}", state


async def populate(store: RedisStore, n: int, uuid_ids: bool, batch: int, scoring: str
                   ) -> int:
    """Write ``n`` customers through ``RedisStore.commit``; returns the orders written."""
    settings = Settings()
    thresholds = Thresholds.fixed(settings.fixed_thresholds())
    if scoring == "quintiles":  # anchored at the as-of time: no due times
        thresholds = replace(thresholds, version="q", anchor_ms=AS_OF)
    table = SegmentTable.load()
    seq = dict.fromkeys(range(PARTITIONS), -1)
    pending: dict[int, list[CustomerWrite]] = defaultdict(list)

    async def commit(p: int) -> None:
        seq[p] = await store.commit(p, seq[p], {"wm": AS_OF, "asof": AS_OF}, pending.pop(p), [])

    written = 0
    for i, (cid, state) in enumerate(customer_states(n, uuid_ids)):
        written += state.frequency  # one purchase event per order: every order counts
        last, f, m = state.last_purchase_ms, state.frequency, state.monetary_minor
        scores = thresholds.score(thresholds.scoring_days(last, AS_OF), f, m)
        customer = StoredCustomer(cid, state, table.lookup(*scores).name, i % 5, scores, last)
        p = partition_for(cid)
        pending[p].append(CustomerWrite(cid, thresholds.next_recency_change_ms(last, AS_OF),
                                        customer, (last, f, m)))
        if len(pending[p]) >= batch:
            await commit(p)
        if (i + 1) % 100_000 == 0:
            print(f"  {i + 1:,} customers written", flush=True)
    for p in list(pending):
        await commit(p)
    return written


async def usage(client: aioredis.Redis, key: str) -> int:
    return int(await client.memory_usage(key, samples=0) or 0)


async def breakdown(client: aioredis.Redis, store: RedisStore, n: int, sample: int
                    ) -> tuple[dict[str, float], str]:
    """Bytes per customer of each structure (whole keys, or a sample of customer values),
    and a line about the customer values' payload."""
    parts: dict[str, float] = defaultdict(float)
    for p in range(PARTITIONS):
        k: PartitionKeys = store.keys(p)
        if store.chunked:
            for dim, base in zip(("recency", "frequency", "monetary"), k.chunk_bases,
                                 strict=True):
                glob = base.replace("{", "\\{").replace("}", "\\}") + "*"
                async for key in client.scan_iter(match=glob, count=1000):
                    parts[f"p:{base.split(':')[-2]}:* ({dim} population, chunked)"] += \
                        await usage(client, key) / n
        for name, key in [("z:last (recency population)", k.z_last),
                          ("z:freq (frequency population)", k.z_freq),
                          ("z:mon (monetary population)", k.z_mon), ("due (due times)", k.due),
                          ("segcount", k.segcount), ("outbox", k.outbox), ("meta", k.meta),
                          ("model", k.model)]:
            parts[name] += await usage(client, key) / n
    rng = random.Random(7)
    picked = [f"c{rng.randrange(n):07d}" for _ in range(sample)]
    keys = [store.keys(partition_for(c)).customer(c) for c in picked]
    sizes = [await usage(client, key) for key in keys]
    parts["c:<id> (customer values, key included)"] = sum(sizes) / len(sizes)
    note = f"customer value: {await client.type(keys[0])} ({await client.object('encoding', keys[0])})"
    if await client.type(keys[0]) == "string":
        lengths = [await client.strlen(key) for key in keys]
        raw = await client.execute_command("GET", keys[0], **{NEVER_DECODE: []})
        note += (f", {sum(lengths) / len(lengths):.0f} bytes of payload on average (STRLEN), "
                 f"e.g. MessagePack {msgpack.unpackb(raw, raw=True)}")
    return parts, note


async def main(n: int, uuid_ids: bool, batch: int, sample: int, scoring: str, layout: str
               ) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = localstack.start_redis(Path(tmp))
        client = aioredis.Redis(host=localstack.LOOPBACK, port=server.port,
                                decode_responses=True, socket_timeout=600)
        try:
            info = await client.info("server")
            before = int((await client.info("memory"))["used_memory"])
            store = RedisStore(client, "mem", population_layout=layout)
            started = time.perf_counter()
            written = await populate(store, n, uuid_ids, batch, scoring)
            seconds = time.perf_counter() - started
            mem = await client.info("memory")
            used = int(mem["used_memory"]) - before
            parts, note = await breakdown(client, store, n, sample)
            zset_enc = await client.object(
                "encoding", store.keys(0).chunk_bases[0] + "c:" if store.chunked
                else store.keys(0).z_last)
            config = await client.config_get("zset-max-*")
        finally:
            await client.aclose()
            server.stop()
    print(benchkit.machine())
    print(f"Redis memory: {n:,} customers, {written:,} orders ({written / n:.2f} per customer), "
          f"{PARTITIONS} partitions, ids {'UUID' if uuid_ids else 'pos-<n> / pos-<n>-1'}, "
          f"{scoring} scoring, populations {layout}; "
          f"written through RedisStore.commit in {seconds:.0f} s")
    print(f"  redis-server {info['redis_version']}; population sets: {zset_enc} ({config})")
    print(f"  {note}")
    print(f"  used_memory grew by {used / 2**20:,.1f} MiB = {used / n:,.0f} bytes per customer; "
          f"target <= {TARGET}: {'met' if used / n <= TARGET else 'not met'} "
          f"({used / n / TARGET:.2f}x the target)")
    print("  per customer, by structure (MEMORY USAGE):")
    for name, b in sorted(parts.items(), key=lambda kv: -kv[1]):
        if b >= 0.05:
            print(f"    {name:<42}{b:>8.1f} B  {b / (used / n):6.1%}")
    rest = used / n - sum(parts.values())
    print(f"    {'unattributed (keyspace buckets, allocator)':<42}{rest:>8.1f} B  "
          f"{rest / (used / n):6.1%}")
    print(f"  (customer values: mean of a sample of {sample:,}; the other keys whole; "
          f"used_memory_rss {int(mem['used_memory_rss']) / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--uuid-ids", action="store_true", help="UUID order and event ids")
    ap.add_argument("--batch", type=int, default=1000, help="customers per commit")
    ap.add_argument("--sample", type=int, default=10_000,
                    help="customer values measured with MEMORY USAGE")
    ap.add_argument("--scoring", choices=("quintiles", "fixed"), default="quintiles",
                    help="quintiles (the default: no due times) or fixed thresholds")
    ap.add_argument("--layout", choices=("sorted_sets", "chunked"), default="chunked",
                    help="how the populations are kept (RFM_POPULATION_LAYOUT)")
    a = ap.parse_args()
    asyncio.run(main(a.customers, a.uuid_ids, a.batch, a.sample, a.scoring, a.layout))
