"""Replay throughput: the CDNOW topic (69,659 events) replayed into a fresh namespace, topic to
committed state, in event time, against the 10 s target and against a raw aiokafka consume of
the same topic measured in the same run. Prints figures; asserts nothing.

    .venv/bin/python bench/replay_throughput.py [--partitions 1] [--processes 1]

The load into the topic is not timed; the replay is, from its start to its last commit. The
ceiling: a bare ``AIOKafkaConsumer.getmany`` loop over the same topic from the beginning to its
high watermark (median of 3 timed passes after an untimed one). One partition by default, as
``make demo`` loads it. About a minute with the replay at ~1,500 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import benchkit

from stream import cdnow, localstack
from stream.allocator import settle_gc
from stream.demo import ensure_topics, load_cdnow, local_settings
from stream.kafka_io import bootstrap_of
from stream.replay import replay

TARGET_S = 10.0


async def main(partitions: int, processes: int) -> None:
    rows = sorted(cdnow.read_rows(), key=lambda r: r.day)
    with tempfile.TemporaryDirectory() as tmp, localstack.running(Path(tmp)) as stack:
        settings = local_settings(stack, namespace="bench-live", partitions=partitions,
                                  purchases_topic="bench-purchases")
        await ensure_topics(settings)
        await load_cdnow(settings, rows, show=False)
        raw = benchkit.median(await benchkit.raw_consume_rates(bootstrap_of(settings.kafka_url),
                                                               settings.purchases_topic))
        settle_gc(settings.gc_thresholds, settings.gc_freeze)  # as `rfm-stream replay` does
        started = time.perf_counter()
        summary = await replay(settings, "bench-replay", processes=processes)
        seconds = time.perf_counter() - started
    rate = summary.records / seconds
    print(benchkit.machine())
    print(f"replay of {summary.records:,} CDNOW events ({partitions} partition(s), "
          f"{min(processes, partitions)} process(es)) into a new namespace: {seconds:.1f} s, "
          f"{rate:,.0f} events/s, {summary.changes:,} segment "
          "changes (not published)")
    print(f"  target <= {TARGET_S:g} s: {'met' if seconds <= TARGET_S else 'not met'} "
          f"({seconds / TARGET_S:.2f}x the target; {summary.records / TARGET_S:,.0f} events/s "
          "needed)")
    print(f"  ceiling: raw aiokafka getmany of the same topic {raw:,.0f} events/s "
          f"({summary.records / raw:.2f} s); replay / raw = {rate / raw:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1,
                        help="replay processes (rfm-stream replay --processes)")
    a = parser.parse_args()
    asyncio.run(main(a.partitions, a.processes))
