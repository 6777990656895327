"""Replay throughput: the CDNOW topic (69,659 events) replayed into a fresh namespace, topic to
committed state, in event time. Prints figures; asserts nothing.

    .venv/bin/python bench/replay_throughput.py [--partitions 1]

The load into the topic is not timed; the replay is, from its start to its last commit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

from stream import cdnow, localstack
from stream.demo import ensure_topics, load_cdnow, local_settings
from stream.replay import replay


async def main(partitions: int) -> None:
    rows = sorted(cdnow.read_rows(), key=lambda r: r.day)
    with tempfile.TemporaryDirectory() as tmp:
        stack = localstack.start(Path(tmp))
        try:
            settings = local_settings(stack, namespace="bench-live", partitions=partitions,
                                      purchases_topic="bench-purchases")
            await ensure_topics(settings)
            await load_cdnow(settings, rows, show=False)
            started = time.perf_counter()
            summary = await replay(settings, "bench-replay")
            seconds = time.perf_counter() - started
        finally:
            stack.stop()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print(f"replay of {summary.records:,} CDNOW events ({partitions} partition(s)) into a new "
          f"namespace: {seconds:.1f} s, {summary.records / seconds:,.0f} events/s, "
          f"{summary.changes:,} segment changes (not published)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=1)
    asyncio.run(main(parser.parse_args().partitions))
