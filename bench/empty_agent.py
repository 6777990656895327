"""An empty faust consumer: the ceilings the worker's throughput is measured against.

The faust app is built as ``stream/app.py`` ``create_app`` builds the worker's (same ``RFM_*``
settings: broker, raw key/value serializers, session/heartbeat/commit intervals, partitions,
``broker_max_poll_records = batch_max``, producer linger, batch size and acks; keep the two in
step), in a process with the worker's malloc and GC settings (``stream/allocator.py``), and
consumes the purchases topic doing nothing with it, in one of two ways (``BENCH_MODE``):

``agent`` (default)
    the issue's ceiling: an empty faust agent, concurrency 1, taking
    ``stream.take_events(batch_max, within=BENCH_WITHIN_S)`` batches (0.05 s, the worker's
    former ``batch_within_s``) through faust's per-event path;
``batch``
    the worker's own delivery path (``stream.fastpath.BatchTransport``: one call per fetched
    batch, the worker's ``fetch_max_wait_ms``) with a handler that does nothing.

After each batch it appends ``<events counted> <events of the first batch> <wall time of the
first batch> <wall time now>`` to the file named by ``BENCH_PROGRESS``. Started by the
benchmarks (``benchkit.start_empty_agent``), which stop it by its PID; by hand::

    BENCH_PROGRESS=/tmp/p RFM_KAFKA_URL=kafka://127.0.0.1:9092 RFM_APP_ID=empty \\
        .venv/bin/python bench/empty_agent.py worker --web-bind 127.0.0.1 --web-port 6067
"""

from __future__ import annotations

import os
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any

import faust

from stream.allocator import freeze_gc, tune_gc, tune_malloc
from stream.faustconf import faust_options
from stream.settings import Settings

settings = Settings()
# the worker's process settings too (stream/cli.py worker, stream/app.py _started)
tune_malloc(settings.malloc_mmap_threshold_bytes, settings.malloc_arena_max)
tune_gc(settings.gc_thresholds)
MODE = os.environ.get("BENCH_MODE", "agent")
WITHIN_S = float(os.environ.get("BENCH_WITHIN_S", "0.05"))
Path(settings.data_dir).mkdir(parents=True, exist_ok=True)  # as stream.app.create_app does
app = faust.App(settings.app_id, **faust_options(settings))  # the worker's own settings
purchases = app.topic(settings.purchases_topic, partitions=settings.partitions,
                      key_type=bytes, value_type=bytes)
progress = open(os.environ["BENCH_PROGRESS"], "a", buffering=1)  # noqa: SIM115 - line by line
counted = {"n": 0, "first_n": 0, "first_t": 0.0}


def count(batch: Sized) -> None:
    now = time.time()
    if not counted["n"]:
        counted["first_n"], counted["first_t"] = len(batch), now
    counted["n"] += len(batch)
    progress.write(f"{counted['n']} {counted['first_n']} {counted['first_t']} {now}\n")




@app.task
async def _started() -> None:
    if settings.gc_freeze:
        freeze_gc()


if MODE == "batch":
    from stream.fastpath import BatchTransport

    async def nothing_batch(messages: list[Any]) -> None:
        count(messages)

    app.transport = BatchTransport(app.conf.broker_consumer, app,
                                   fetch_max_wait_ms=settings.fetch_max_wait_ms)
    app.transport.batch_handlers[settings.purchases_topic] = nothing_batch
    app.topics.add(purchases)
else:
    @app.agent(purchases, concurrency=1)
    async def nothing(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=WITHIN_S):
            count(events)


if __name__ == "__main__":
    app.main()
