"""CPU of the worker's batch processing alone, without Kafka: the CDNOW events (69,659, 4
partitions as the default partitioner puts them, each in event-time order) through
``BatchProcessor.process`` into a fresh namespace of a local redis-server, the partitions moving
through event time together as a live worker's do (a week of skew, fetches of 2,000), each
partition's outbox drained after its batch by the same publisher with a producer that
acknowledges at once; the worker's GC settings.

Prints the CPU seconds of this process (and wall seconds) per run: steadier than the end-to-end
benchmark (`worker_throughput.py`, whose figures move 20-30% between runs with the machine's
other load), so a change to the per-event path shows here first. Asserts nothing.

    .venv/bin/python bench/pipeline_cpu.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import uuid
from typing import Any

import orjson

from stream import localstack
from stream.allocator import settle_gc
from stream.cdnow import read_rows
from stream.interleave import EventTimeMerge
from stream.kafka_io import key_partition
from stream.outbox import OutboxPublisher
from stream.pipeline import RawRecord
from stream.services import build_services
from stream.settings import Settings

PARTITIONS, FETCH, SKEW_MS = 4, 2_000, 7 * 86_400_000


def partitions() -> dict[int, list[tuple[bytes, bytes, int]]]:
    """CDNOW as the load puts it in the topic: per partition, (key, value, event ms)."""
    rows = sorted(read_rows(), key=lambda r: r.occurred_at)  # stable: as `load` sorts
    out: dict[int, list[tuple[bytes, bytes, int]]] = {p: [] for p in range(PARTITIONS)}
    for r in rows:
        key = r.customer_id.encode()
        out[key_partition(key, PARTITIONS)].append(
            (key, orjson.dumps(r.event()), int(r.occurred_at.timestamp() * 1000)))
    return out


async def one_run(redis_url: str, parts: dict[int, list[tuple[bytes, bytes, int]]]
                  ) -> tuple[float, float, int]:
    services = build_services(Settings(redis_url=redis_url, namespace=f"cpu{uuid.uuid4().hex[:8]}",
                                       partitions=PARTITIONS))

    async def send(topic: str, records: list[Any]) -> Any:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    publisher = OutboxPublisher(services.store, send, "changes", "segments", "dlq")
    await publisher.assign(range(PARTITIONS))
    merge: EventTimeMerge[RawRecord] = EventTimeMerge(range(PARTITIONS), SKEW_MS)
    position = dict.fromkeys(range(PARTITIONS), 0)
    changes = 0

    async def one(p: int, records: list[RawRecord]) -> None:
        nonlocal changes
        result = await services.processor.process(p, records)  # (not `+= await`: a lost update)
        changes += len(result.changes)
        await publisher.drain([p])

    cpu, wall = time.process_time(), time.perf_counter()
    while not all(merge.drained(p) for p in range(PARTITIONS)):
        for p in range(PARTITIONS):
            if merge.empty(p) and not merge.exhausted(p):
                start = position[p]
                fetched = parts[p][start:start + FETCH]
                merge.add(p, [RawRecord("purchases", p, start + i, k, v)
                              for i, (k, v, _) in enumerate(fetched)], [t for *_, t in fetched])
                position[p] += len(fetched)
                if position[p] >= len(parts[p]):
                    merge.exhaust(p)
        ready = merge.release()
        await asyncio.gather(*(one(p, records) for p, records in ready.items()))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await services.store.client.aclose()
    return cpu, wall, changes


async def main(runs: int) -> None:
    parts = partitions()
    total = sum(map(len, parts.values()))
    settle_gc(Settings().gc_thresholds, True)  # as the worker (stream/allocator.py)
    with localstack.running() as stack:
        for run in range(1, runs + 1):
            cpu, wall, changes = await one_run(stack.redis_url, parts)
            print(f"run {run}: {cpu:.2f} CPU s, {wall:.2f} s wall, {changes:,} changes: "
                  f"{total / cpu:,.0f} events per CPU second", flush=True)
            gc.collect()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    asyncio.run(main(ap.parse_args().runs))
