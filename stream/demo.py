"""``make demo``: the whole pipeline on the CDNOW purchases, on the embedded local stack.

Starts a Kafka-protocol broker and a redis-server on free loopback ports, creates the topics,
loads all 69,659 CDNOW purchases, runs a real worker until every event is applied, then writes
``out/demo/customers.csv`` (scored at the event-time watermark, the last date of the file) and
``out/demo/segment_changes.jsonl`` (read back from the topic), and prints a report. Everything
it started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import orjson
from tqdm import tqdm

from stream import cdnow, localstack
from stream.export import ExportRow, scored_customers, write_csv, write_jsonl
from stream.kafka_io import Message, client_options, compact, create_topics, produce, read_all
from stream.runner import WorkerProcess, start_worker, store_for, wait_applied
from stream.segments import SegmentTable
from stream.settings import Settings
from stream.timeline import utc


def local_settings(stack: localstack.LocalStack, **overrides: object) -> Settings:
    """Settings for a worker on the local stack: loopback, free web port, fast group join,
    faust's data directory in the stack's folder (gone with the stack)."""
    values: dict[str, object] = dict(
        kafka_url=stack.kafka_url, redis_url=stack.redis_url, web_bind=localstack.LOOPBACK,
        web_port=localstack.free_port(), session_timeout_s=6.0, heartbeat_interval_s=1.0,
        commit_interval_s=0.5, data_dir=str(stack.workdir / "faust"))
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def cdnow_messages(rows: Sequence[cdnow.CdnowRow]) -> list[Message]:
    """CDNOW rows as purchase records: key = customer, record timestamp = event time."""
    return [Message(r.customer_id.encode(), compact(orjson.dumps(r.event())),
                    int(r.occurred_at.timestamp() * 1000)) for r in rows]


async def load_cdnow(settings: Settings, rows: Sequence[cdnow.CdnowRow], show: bool = True
                     ) -> dict[int, int]:
    """Produce CDNOW rows into the purchases topic; returns ``{partition: last offset}``."""
    with tqdm(total=len(rows), desc="load purchases", unit="ev", disable=not show,
              mininterval=1.0) as bar:
        return await produce(client_options(settings), settings.purchases_topic,
                             cdnow_messages(rows), progress=bar.update)


async def ensure_topics(settings: Settings) -> None:
    """Create the purchases, dead-letter, segment-changes and customer-segments topics."""
    await create_topics(client_options(settings), {
        settings.purchases_topic: settings.partitions, settings.dead_letter_topic: 1,
        settings.segment_changes_topic: 1, settings.customer_segments_topic: 1},
        compacted={settings.customer_segments_topic})


async def run_to_completion(settings: Settings, targets: dict[int, int], log_path: Path,
                            show: bool = True, timeout_s: float = 600.0) -> None:
    """Start a worker, wait until every target offset is applied, stop it (SIGTERM)."""
    worker: WorkerProcess = start_worker(settings, log_path)
    store = store_for(settings)
    total = sum(o + 1 for o in targets.values())
    try:
        with tqdm(total=total, desc="process", unit="ev", disable=not show,
                  mininterval=1.0) as bar:
            def progress(n: int) -> None:
                if n and not bar.n and show:  # the worker is up: its web server listens
                    bar.write(f"worker pid {worker.pid}: http://{settings.web_bind}:"
                              f"{settings.web_port}/metrics (also /health /ready /segments "
                              f"/clusters /customers/ID), log {log_path}")
                bar.update(max(0, n - bar.n))
            await wait_applied(store, targets, [worker], timeout_s, progress)
    finally:
        worker.stop()
        await store.client.aclose()


@dataclass
class DemoResult:
    rows: list[ExportRow]
    changes: int
    dead_letters: int
    as_of: datetime
    model_version: int


async def export(settings: Settings, out_dir: Path) -> DemoResult:
    """Write customers.csv and segment_changes.jsonl; return what the report needs."""
    rows, as_of, model = await scored_customers(settings)
    write_csv(rows, out_dir / "customers.csv")
    kafka = client_options(settings)
    changes = await read_all(kafka, settings.segment_changes_topic)
    n_changes = write_jsonl((v for *_, v in changes), out_dir / "segment_changes.jsonl")
    dead = await read_all(kafka, settings.dead_letter_topic, idle_s=0.5)
    return DemoResult(rows, n_changes, len(dead), utc(as_of),
                      int(model["version"]) if model else 0)


def report(result: DemoResult, table: SegmentTable) -> str:
    """The demo's printed summary: segments, clusters, changes, dead letters."""
    rows = result.rows
    lines = [f"As of {result.as_of.date()} (event-time watermark): {len(rows):,} customers, "
             f"revenue {sum((r.monetary for r in rows), Decimal(0)):,.2f} USD", "",
             f"{'segment':<22}{'customers':>10}{'revenue USD':>16}  strategy"]
    by_seg: dict[str, list[ExportRow]] = defaultdict(list)
    for r in rows:
        by_seg[r.segment].append(r)
    for name, members in sorted(by_seg.items(), key=lambda kv: -sum(r.monetary for r in kv[1])):
        revenue = sum((r.monetary for r in members), Decimal(0))
        lines.append(f"{name:<22}{len(members):>10,}{revenue:>16,.2f}  "
                     f"{table.segments[name].strategy}")
    lines += ["", f"Clusters (River KMeans, model version {result.model_version}: trained "
              f"{result.model_version} times, each time from a sample of the population), "
              "medians in original units:",
              f"{'cluster':>8}{'customers':>11}{'recency d':>11}{'frequency':>11}{'monetary':>11}"]
    by_cl: dict[int | None, list[ExportRow]] = defaultdict(list)
    for r in rows:
        by_cl[r.cluster].append(r)
    for cl, members in sorted(by_cl.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        lines.append(f"{'none' if cl is None else cl:>8}{len(members):>11,}"
                     f"{statistics.median(r.recency_days for r in members):>11.0f}"
                     f"{statistics.median(r.frequency for r in members):>11.1f}"
                     f"{statistics.median(float(r.monetary) for r in members):>11.2f}")
    lines += ["", f"Segment-change events on the topic: {result.changes:,}",
              f"Dead letters: {result.dead_letters:,}"]
    return "\n".join(lines)


async def _demo(stack: localstack.LocalStack, out_dir: Path) -> DemoResult:
    # one partition: the demo's results (segments, changes, clusters) are the same every run
    settings = local_settings(stack, namespace="demo", app_id="rfm-demo", partitions=1)
    await ensure_topics(settings)
    rows = sorted(cdnow.read_rows(), key=lambda r: r.day)  # event-time order (stable)
    targets = await load_cdnow(settings, rows)
    started = time.monotonic()
    await run_to_completion(settings, targets, out_dir / "worker.log")
    elapsed = time.monotonic() - started
    print(f"processed {len(rows):,} events in {elapsed:.1f} s (worker start included)")
    return await export(settings, out_dir)


def main(out_dir: str = "out/demo") -> int:
    """Run the demo; returns the process exit code."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("customers.csv", "segment_changes.jsonl"):  # never mistake old results
        (out / stale).unlink(missing_ok=True)
    print("starting the local stack (Kafka-protocol broker + redis-server on loopback) ...")
    try:
        with localstack.running() as stack:
            result = asyncio.run(_demo(stack, out))
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    print()
    print(report(result, SegmentTable.load()))
    print()
    print(f"wrote {out / 'customers.csv'} ({len(result.rows):,} rows) and "
          f"{out / 'segment_changes.jsonl'} ({result.changes:,} events)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(*sys.argv[1:]))
