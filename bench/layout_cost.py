"""What each population layout (``RFM_POPULATION_LAYOUT``) costs Redis: the CDNOW events
(69,659) in event-time order (as a live stream brings them: most purchases move a known
customer in every population) through the batch processor in one partition, 2,000 records
per call, into a fresh redis-server from ``stream.localstack``, once per layout; prints the
wall time, the changes, and Redis's own time (``INFO commandstats``: scripts include the
commands they call, which are also listed on their own). Prints figures; asserts nothing.

    .venv/bin/python bench/layout_cost.py [--layouts sorted_sets chunked]

No broker: the records go to ``BatchProcessor.process`` directly (the outbox is written, not
published), so the difference between layouts is the populations' upkeep and reads.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import benchkit
import orjson
import redis.asyncio as aioredis

from stream import cdnow, localstack
from stream.pipeline import RawRecord
from stream.services import build_services
from stream.settings import Settings

NOW_MS = 2_000_000_000_000  # the wall clock of every step (2033): after every CDNOW event


async def main(layouts: list[str]) -> None:
    rows = sorted(cdnow.read_rows(), key=lambda r: r.day)  # the file is by customer
    records = [RawRecord("purchases", 0, i, r.customer_id.encode(), orjson.dumps(r.event()))
               for i, r in enumerate(rows)]
    print(benchkit.machine())
    with tempfile.TemporaryDirectory() as tmp:
        server = localstack.start_redis(Path(tmp))
        url = f"redis://{localstack.LOOPBACK}:{server.port}/0"
        try:
            for layout in layouts:
                admin = aioredis.Redis.from_url(url, decode_responses=True)
                await admin.config_resetstat()
                s = build_services(Settings(redis_url=url, partitions=1, namespace=layout,
                                            population_layout=layout))  # type: ignore[arg-type]
                started, changes = time.perf_counter(), 0
                for i in range(0, len(records), 2000):
                    out = await s.processor.process(0, records[i:i + 2000], now_ms=NOW_MS)
                    changes += len(out.changes)
                wall = time.perf_counter() - started
                stats = await admin.info("commandstats")
                scripts = sum(v["usec"] for k, v in stats.items()
                              if k in ("cmdstat_evalsha", "cmdstat_eval"))
                direct = sum(v["usec"] for k, v in stats.items()
                             if not k.startswith("cmdstat_eval"))
                print(f"{layout}: {len(records):,} events in {wall:.2f} s "
                      f"({len(records) / wall:,.0f} events/s), {changes:,} changes; Redis: "
                      f"scripts {scripts / 1e6:.2f} s, every command {direct / 1e6:.2f} s "
                      f"(those in scripts included)")
                for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:6]:
                    print(f"    {name.removeprefix('cmdstat_'):<16} {v['calls']:>8,} calls "
                          f"{v['usec'] / 1e6:6.2f} s  {v['usec_per_call']:8.1f} us per call")
                await s.store.client.aclose()
                await admin.aclose()
        finally:
            server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", choices=("sorted_sets", "chunked"),
                    default=["sorted_sets", "chunked"])
    asyncio.run(main(ap.parse_args().layouts))
