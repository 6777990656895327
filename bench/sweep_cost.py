"""Cost of the inactivity sweep: N stored customers, of whom a share crosses a recency bound
when the watermark moves one day. Prints figures; asserts nothing.

    .venv/bin/python bench/sweep_cost.py [--customers 1000000] [--share 0.01]

Fixed thresholds (recency bounds 30/90/180/365 days), one partition, a real redis-server. Every
customer bought once; ``share`` of them 30.5 days before the watermark (they fall from R5 to R4
in the sweep), the others 10 days before (not due for three weeks). The sweep is timed from
reading the due customers to the commit of their changes. The same sweep is also timed over a
population 10x smaller with the same number of changing customers: the cost follows the
customers that change, not the customers stored.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from state.rfm import MS_PER_DAY, StateEvent, apply_event
from state.store import CustomerWrite, RedisStore, StoredCustomer
from stream import localstack
from stream.metrics import Metrics
from stream.pipeline import BatchProcessor
from stream.scoring import Thresholds
from stream.segments import SegmentTable
from stream.settings import Settings

T0 = 880_000 * 3_600_000  # 2070-05-23: any fixed event time


async def populate(store: RedisStore, n: int, changing: int, table: SegmentTable,
                   thresholds: Thresholds) -> None:
    chunk = 20_000
    seq = -1
    for start in range(0, n, chunk):
        writes = []
        for i in range(start, min(n, start + chunk)):
            last = T0 - (30 * MS_PER_DAY + MS_PER_DAY // 2 if i < changing else 10 * MS_PER_DAY)
            state, _ = apply_event(None, StateEvent(f"e{i}", f"o{i}", "purchase", 2500, last))
            scores = thresholds.score(thresholds.scoring_days(last, T0), 1, 2500)
            c = StoredCustomer(f"c{i:07d}", state, table.lookup(*scores).name, None, scores,
                               last)
            writes.append(CustomerWrite(c.customer_id,
                                        thresholds.next_recency_change_ms(last, T0), c,
                                        (last, 1, 2500)))
        seq = await store.commit(0, seq, {"wm": T0, "asof": T0, "offset": n - 1}, writes, [])


async def measure(redis_url: str, n: int, changing: int) -> tuple[float, int, int]:
    settings = Settings(scoring_mode="fixed", partitions=1, namespace=f"sweep{n}",
                        redis_url=redis_url, min_dwell_s=0)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=600)
    store = RedisStore(client, settings.namespace)
    table = SegmentTable.load()
    processor = BatchProcessor(store, settings.input_rules(), table, settings.scoring(),
                               Metrics.create(), 1, limits=settings.limits,
                               policy=settings.time_policy())
    try:
        await populate(store, n, changing, table, Thresholds.fixed(settings.fixed_thresholds()))
        used = int((await client.info("memory"))["used_memory"])
        await client.hset(store.keys(0).meta, "wm", T0 + MS_PER_DAY)  # the watermark moves
        started = time.perf_counter()
        result = await processor.sweep(0)
        seconds = time.perf_counter() - started
        return seconds, len(result.changes), used
    finally:
        await client.flushall(asynchronous=True)
        await client.aclose()


async def main(customers: int, share: float) -> None:
    changing = int(customers * share)
    with tempfile.TemporaryDirectory() as tmp:
        redis = localstack.start_redis(Path(tmp))
        url = f"redis://{localstack.LOOPBACK}:{redis.port}/0"
        try:
            print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}")
            for n in (customers // 10, customers):
                seconds, changes, used = await measure(url, n, changing)
                print(f"{n:>9,} stored customers, {changing:,} due: sweep {seconds:.2f} s, "
                      f"{changes:,} inactivity changes, {seconds / max(changes, 1) * 1e6:.0f} "
                      f"µs per changed customer (Redis used_memory {used / 2**20:,.0f} MiB)")
        finally:
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--share", type=float, default=0.01)
    args = parser.parse_args()
    asyncio.run(main(args.customers, args.share))
