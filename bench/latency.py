"""Latency from a purchase's produce time to its segment change on ``segment-changes``, at a
steady produce rate, against the broker's own latency measured in the same run. Prints
figures; asserts nothing.

    .venv/bin/python bench/latency.py [--rate 5000] [--seconds 30] [--drain 30]

A real worker (``rfm-stream worker``, default settings of the local stack, 4 partitions) runs
on the local stack; after a warm-up (``--warmup`` events, waited for until applied) the
benchmark produces purchases of fresh customers at ``--rate`` events/s for ``--seconds``
(each one the customer's first purchase, so each one changes its segment: ``cause =
"purchase"``, ``cause_event_id`` = the event). One aiokafka consumer (no group) reads the
segment-changes topic and, as the ceiling, the purchases topic itself: per event, the time
from ``producer.send`` to its record arriving (raw) and to its change arriving (worker).
Percentiles count the changes not received ``--drain`` seconds after the last produce as
infinitely late. When the worker applies fewer events/s than are produced, the backlog grows
and so does the latency: the output says so. About ``seconds + drain + 20`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import benchkit
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from stream import localstack
from stream.demo import ensure_topics, local_settings
from stream.kafka_io import Message, bootstrap_of, produce
from stream.runner import WorkerProcess, store_for, wait_applied
from stream.settings import Settings

TARGET_P99_MS = 50.0
QS = (50, 95, 99, 100)
FETCH_WAIT_MS = 10


def purchase(customer_id: str, now: datetime) -> bytes:
    """A valid ``PurchaseRecorded`` (the customer's first order)."""
    return orjson.dumps({"event_id": f"{customer_id}-e", "customer_id": customer_id,
                         "order_id": f"{customer_id}-o", "type": "purchase", "amount": "12.99",
                         "currency": "USD", "occurred_at": now.isoformat(), "quantity": 1,
                         "attributes": {"channel": "bench"}})


class Receiver:
    """Reads the purchases and segment-changes topics; records arrival delays per customer."""

    def __init__(self, settings: Settings, sent: dict[str, float]):
        self.settings, self.sent = settings, sent
        self.raw: dict[str, float] = {}
        self.changes: dict[str, float] = {}
        self.wall: dict[str, float] = {}  # produce time, epoch s
        self.to_batch: dict[str, float] = {}  # produce -> the worker's step (emitted_at)
        self.from_batch: dict[str, float] = {}  # emitted_at -> the change received
        # emitted_at -> the relay's send (the change record's timestamp: the relay's producer
        # stamps it when the record is put in a batch), and that send -> received
        self.to_send: dict[str, float] = {}
        self.from_send: dict[str, float] = {}
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_of(settings.kafka_url),
                                         group_id=None, enable_auto_commit=False,
                                         auto_offset_reset="latest",
                                         fetch_max_wait_ms=FETCH_WAIT_MS)

    async def start(self) -> None:
        s = self.settings
        await self.consumer.start()
        tps = [TopicPartition(s.purchases_topic, p) for p in range(s.partitions)]
        tps.append(TopicPartition(s.segment_changes_topic, 0))
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, not when the first record arrives
            await self.consumer.position(tp)

    async def run(self) -> None:
        changes_topic = self.settings.segment_changes_topic
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for tp, recs in batch.items():
                for r in recs:
                    cid = r.key.decode()
                    if cid not in self.sent:
                        continue  # warm-up
                    if tp.topic != changes_topic:
                        self.raw.setdefault(cid, now - self.sent[cid])
                        continue
                    change = orjson.loads(r.value)
                    if (change["cause"] == "purchase" and change["cause_event_id"] == f"{cid}-e"
                            and cid not in self.changes):
                        self.changes[cid] = now - self.sent[cid]
                        emitted = datetime.fromisoformat(change["emitted_at"]).timestamp()
                        self.to_batch[cid] = emitted - self.wall[cid]
                        received = time.time()
                        self.from_batch[cid] = received - emitted
                        self.to_send[cid] = r.timestamp / 1000 - emitted
                        self.from_send[cid] = received - r.timestamp / 1000


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(settings: Settings) -> Samples:
    """The worker's Prometheus samples (``/metrics``), by (sample name, labels)."""
    url = f"http://127.0.0.1:{settings.web_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def worker_time(before: Samples, after: Samples) -> None:
    """Where the worker's time went between two scrapes: its batch processing time
    (percentiles from the histogram's buckets: each figure is the bucket's upper bound) and
    its Redis calls by kind (count, mean, total)."""
    p = "rfm_processing_latency_seconds"
    buckets = sorted((float(dict(labels)["le"]), v - before.get((name, labels), 0.0))
                     for (name, labels), v in after.items() if name == p + "_bucket")
    total = buckets[-1][1] if buckets else 0
    cells = []
    for q in (50, 99):
        bound = next((le for le, n in buckets if n >= total * q / 100), math.inf)
        cells.append(f"p{q} <= {bound * 1000:g} ms")
    print(f"  worker batches while producing: {total:,.0f}, {', '.join(cells)}")
    calls: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (name, labels), v in after.items():
        if name in ("rfm_redis_call_seconds_count", "rfm_redis_call_seconds_sum"):
            calls[dict(labels)["call"]][name.endswith("_sum")] += v - before.get((name, labels), 0)
    for call, (count, seconds) in sorted(calls.items(), key=lambda kv: -kv[1][1]):
        if count:
            print(f"    redis {call:<12}{count:>8,.0f} calls, mean {seconds / count * 1000:6.2f} ms,"
                  f" total {seconds:6.2f} s")


async def measure(settings: Settings, worker: WorkerProcess, rate: float,
                  seconds: float, drain: float, warmup: int) -> None:
    bootstrap = bootstrap_of(settings.kafka_url)
    store = store_for(settings)
    now = datetime.now(UTC)
    targets = await produce(bootstrap, settings.purchases_topic,
                            [Message(f"warm{i:06d}".encode(), purchase(f"warm{i:06d}", now))
                             for i in range(warmup)])
    await wait_applied(store, targets, [worker], timeout_s=180)
    sent: dict[str, float] = {}
    receiver = Receiver(settings, sent)
    await receiver.start()
    reading = asyncio.create_task(receiver.run())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    parts = range(settings.partitions)
    try:
        applied0 = sum(o + 1 for o, _ in (await store.partition_meta(parts)).values())
        before = await asyncio.to_thread(scrape, settings)
        started, n, futures = time.perf_counter(), 0, []
        while (elapsed := time.perf_counter() - started) < seconds:
            stamp = datetime.now(UTC)
            while n < elapsed * rate:
                cid = f"lat{n:08d}"
                value = purchase(cid, stamp)
                sent[cid] = time.perf_counter()
                receiver.wall[cid] = time.time()
                futures.append(await producer.send(settings.purchases_topic, value,
                                                   key=cid.encode()))
                n += 1
            await asyncio.sleep(0.002)
        produced_s = time.perf_counter() - started
        applied1 = sum(o + 1 for o, _ in (await store.partition_meta(parts)).values())
        await asyncio.gather(*futures)
        deadline = time.perf_counter() + drain
        while len(receiver.changes) < n and time.perf_counter() < deadline and worker.alive():
            await asyncio.sleep(0.1)
        waited = time.perf_counter() - started - produced_s
        after = await asyncio.to_thread(scrape, settings)
    finally:
        reading.cancel()
        await producer.stop()
        await receiver.consumer.stop()
        await store.client.aclose()
    report(settings, rate, seconds, n, produced_s, (applied1 - applied0) / produced_s,
           warmup + n - applied1, receiver, waited)
    worker_time(before, after)


def report(settings: Settings, rate: float, seconds: float, n: int, produced_s: float,
           applied_rate: float, backlog: int, receiver: Receiver, waited: float) -> None:
    def row(name: str, delays: dict[str, float]) -> list[float]:
        ps = benchkit.percentiles(list(delays.values()), n - len(delays), QS)
        cells = "".join(f"{p * 1000:>9.1f}" if math.isfinite(p) else f"{'never':>9}"
                        for p in ps)
        print(f"  {name:<28}{cells}   ({len(delays):,} of {n:,} received)")
        return ps

    print(benchkit.machine())
    print(f"latency, produce -> arrival, fresh customers (first purchase each), "
          f"{settings.partitions} partitions, worker batch_max {settings.batch_max}:")
    print(f"  produced {n:,} purchases in {produced_s:.1f} s: {n / produced_s:,.0f} events/s "
          f"(asked {rate:,.0f}/s for {seconds:g} s)")
    behind = applied_rate < 0.95 * n / produced_s
    print(f"  worker applied {applied_rate:,.0f} events/s while they were produced; backlog at "
          f"the end of producing: {backlog:,} events -> "
          + ("FELL BEHIND: the latencies below grow with the backlog (queueing), they are "
             "not the worker's latency at this rate" if behind else "kept up"))
    print(f"  waited {waited:.1f} s after the last produce for the changes")
    print(f"  {'ms':<28}" + "".join(f"{'p' + str(q) if q < 100 else 'max':>9}" for q in QS))
    worker = row("worker: segment change", receiver.changes)
    row("  produce -> worker's step", receiver.to_batch)
    row("  worker's step -> received", receiver.from_batch)
    row("    step -> relay's send", receiver.to_send)
    row("    relay's send -> received", receiver.from_send)
    raw = row("ceiling: raw aiokafka record", receiver.raw)
    print(f"  (fetch_max_wait_ms: raw consumer {FETCH_WAIT_MS}, worker "
          f"{settings.fetch_max_wait_ms}; the local broker answers a fetch that found no data "
          "only after up to that wait, even when records arrive meanwhile)")
    p99 = worker[2] * 1000
    verdict = "met" if p99 <= TARGET_P99_MS else "not met"
    ratio = worker[2] / raw[2] if math.isfinite(worker[2]) and raw[2] > 0 else math.inf
    shown = f"{ratio:,.1f}x" if math.isfinite(ratio) else "n/a (changes missing)"
    print(f"  p99 worker / raw aiokafka: {shown}; target p99 <= {TARGET_P99_MS:g} ms at "
          f"5,000 events/s: {verdict}"
          + ("" if rate == 5000 else f" (this run: {rate:,.0f} events/s)"))


async def main(rate: float, seconds: float, drain: float, warmup: int, logs: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, localstack.running(Path(tmp)) as stack:
        settings = local_settings(stack, namespace="latency", app_id="rfm-latency")
        await ensure_topics(settings)
        log_path = Path(logs or tmp) / "worker-latency.log"
        worker = benchkit.start_worker(settings, log_path)
        try:
            await measure(settings, worker, rate, seconds, drain, warmup)
        finally:
            worker.stop()
        print("worker log: " + benchkit.log_problems(log_path))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=5000, help="events/s produced")
    ap.add_argument("--seconds", type=float, default=30, help="how long to produce")
    ap.add_argument("--drain", type=float, default=30,
                    help="seconds to wait for the changes after the last produce")
    ap.add_argument("--warmup", type=int, default=1000, help="events applied before timing")
    ap.add_argument("--logs", help="keep the worker log in this directory")
    a = ap.parse_args()
    asyncio.run(main(a.rate, a.seconds, a.drain, a.warmup, a.logs))
