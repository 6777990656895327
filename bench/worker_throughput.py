"""Worker throughput on the CDNOW load: events/second from topic to Redis state (and segment
changes), one worker process, on the embedded local stack. Prints figures; asserts nothing.

    make bench            # or: .venv/bin/python bench/worker_throughput.py [--runs 3]

The clock starts when the worker applies its first batch (group join excluded) and stops when
Redis's last applied offset of every partition reaches the end of the load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from stream import cdnow, localstack
from stream.demo import ensure_topics, load_cdnow, local_settings
from stream.runner import start_worker, store_for


async def one_run(stack: localstack.LocalStack, run: int, rows: list, log_dir: Path) -> float:
    settings = local_settings(stack, namespace=f"bench{run}", app_id=f"rfm-bench{run}",
                              purchases_topic=f"bench{run}-purchases",
                              dead_letter_topic=f"bench{run}-dlq",
                              segment_changes_topic=f"bench{run}-changes")
    await ensure_topics(settings)
    targets = await load_cdnow(settings, rows, show=False)
    store = store_for(settings)
    worker = start_worker(settings, log_dir / f"worker{run}.log")
    try:
        started = None
        while True:
            meta = await store.partition_meta(targets)
            if started is None and any(off >= 0 for off, _ in meta.values()):
                started = time.perf_counter()
                first_applied = sum(off + 1 for off, _ in meta.values())
            if all(meta[p][0] >= t for p, t in targets.items()):
                break
            if not worker.alive():
                raise RuntimeError(worker.log_tail())
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        worker.stop()
        await store.client.aclose()
    return (len(rows) - first_applied) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = sorted(cdnow.read_rows(), key=lambda r: r.day)
    with tempfile.TemporaryDirectory() as tmp, localstack.running(Path(tmp)) as stack:
        rates = [asyncio.run(one_run(stack, i, rows, Path(tmp))) for i in range(args.runs)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"worker throughput, CDNOW {len(rows):,} events, 4 partitions, 1 worker process:")
    for i, r in enumerate(rates):
        print(f"  run {i + 1}: {r:,.0f} events/s")
    print(f"  median: {statistics.median(rates):,.0f} events/s "
          "(ceiling for reference, DESIGN.md: empty faust agent ~12,000 events/s)")


if __name__ == "__main__":
    main()
