"""Worker RSS over a long run: a generated stream of purchase events is loaded into a topic of
4 partitions, then one real worker (``rfm-stream worker``) applies it while its resident set
size (psutil) is sampled every few seconds; then, as the ceiling, the empty faust agent
(``bench/empty_agent.py``) reads the same topic, sampled the same way (every second at most).
Prints the samples, first/last/max and the slope in MiB per million events of each; asserts
nothing. The target: the worker's RSS flat over a 10M-event run.

    .venv/bin/python bench/rss_soak.py [--events 1000000] [--interval 5]
    .venv/bin/python bench/rss_soak.py --events 1200000 --customers 12000   # steady state
    .venv/bin/python bench/rss_soak.py --events 10000000 --customers 12000  # the issue's run

With ``n / 8`` customers every customer's state keeps growing until the end of the run (8
orders each on average), and so does what the worker's customer cache holds (bounded at
``RFM_CACHE_CUSTOMERS`` customers of up to 32 orders and 32 event ids each, 2-3 KB): on a short
run that bounded fill shows as a slope. ``--customers`` fixes the population instead: once
each customer has 32 orders (after ``32 * customers`` events) the state stops growing and the
worker's RSS should stay flat.

Events: ``events / 8`` customers (8 orders each on average, picked at random), one purchase
per order, event times rising over two years, amounts 5-200 USD. The load is not timed (about
30 s per million events). Time: the load, ``events / rate`` for the worker and again for the
empty agent (~8,000 events/s): with the worker at ~1,500-2,000 events/s on this load (many
customers, every 1,000 offsets a threshold refresh re-scores them) the default 1M take about
12 minutes in all, and 10M about two hours (the broker keeps every
record in memory, about 155 bytes each: ~1.5 GiB for 10M, and Redis ~1.3 GiB for 1.25M
customers). The slope is a least-squares fit over the samples after the first 20% of the
events (start-up and the first customers excluded), and over all samples from the first
batch on.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import benchkit
import orjson
import psutil

from stream import localstack
from stream.demo import ensure_topics, local_settings
from stream.kafka_io import Message, bootstrap_of, produce
from stream.runner import WorkerProcess, store_for

START_MS = 1_656_633_600_000  # 2022-07-01T00:00:00Z
SPAN_MS = 730 * 86_400_000
MIB = 2**20


def events(n: int, customers: int, seed: int = 42) -> Iterator[Message]:
    """``n`` purchase records of ``customers`` customers picked at random, rising event times."""
    rng = random.Random(seed)
    for i in range(n):
        cid = f"s{rng.randrange(customers):08d}"
        t = START_MS + SPAN_MS * i // n
        value = orjson.dumps({
            "event_id": f"soak-{i}-1", "customer_id": cid, "order_id": f"soak-{i}",
            "type": "purchase", "amount": f"{rng.randrange(500, 20_000) / 100:.2f}",
            "currency": "USD", "occurred_at": datetime.fromtimestamp(t / 1000, UTC).isoformat(),
            "quantity": 1, "attributes": {"channel": "bench"}})
        yield Message(cid.encode(), value, t)


def slope(samples: list[tuple[float, int, int]]) -> float:
    """Least-squares slope of RSS (MiB) over events applied (millions)."""
    xs = [s[1] / 1e6 for s in samples]
    ys = [s[2] / MIB for s in samples]
    if len(xs) < 2 or max(xs) == min(xs):
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
            / sum((x - mx) ** 2 for x in xs))


Sample = tuple[float, int, int]  # (seconds, events done, RSS bytes)


async def sample_rss(proc: WorkerProcess, done: Callable[[], Awaitable[int]], n: int,
                     interval: float) -> list[Sample]:
    """Sample a process's RSS with its progress every ``interval`` s until ``n`` events."""
    ps = psutil.Process(proc.pid)
    samples: list[Sample] = []
    started = time.perf_counter()
    print(f"{'s':>7}{'events':>12}{'RSS MiB':>9}")
    while True:
        sample = (time.perf_counter() - started, await done(), ps.memory_info().rss)
        samples.append(sample)
        print(f"{sample[0]:>7.0f}{sample[1]:>12,}{sample[2] / MIB:>9.1f}", flush=True)
        if sample[1] >= n:
            return samples
        if not proc.alive():
            raise RuntimeError(proc.log_tail())
        await asyncio.sleep(interval)


def summary(name: str, samples: list[Sample], n: int) -> None:
    active = [s for s in samples if s[1] > 0] or samples  # from the first batch on
    rss = [s[2] / MIB for s in active]
    rate = ((active[-1][1] - active[0][1]) / (active[-1][0] - active[0][0])
            if active[-1][0] > active[0][0] else float("nan"))
    late = [s for s in active if s[1] >= 0.2 * n]
    half = [s for s in active if s[1] >= 0.5 * n]
    print(f"  {name}: ~{rate:,.0f} events/s, {len(samples)} samples; RSS at the first batch "
          f"{rss[0]:.1f} MiB, last {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB; slope "
          f"{slope(late):+.1f} MiB per million events after the first 20% of events "
          f"({slope(active):+.1f} from the first batch, {slope(half):+.1f} over the second "
          "half)")


async def main(n: int, customers: int, interval: float, logs: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, localstack.running(Path(tmp)) as stack:
        log_dir = Path(logs or tmp)
        settings = local_settings(stack, namespace="soak", app_id="rfm-soak")
        await ensure_topics(settings)
        print(f"loading {n:,} events ...", flush=True)
        loaded = time.perf_counter()
        targets = await produce(bootstrap_of(settings.kafka_url), settings.purchases_topic,
                                events(n, customers))
        print(f"loaded in {time.perf_counter() - loaded:.0f} s; the worker starts", flush=True)
        store = store_for(settings)

        async def applied() -> int:
            return sum(off + 1 for off, _ in (await store.partition_meta(targets)).values())

        worker = benchkit.start_worker(settings, log_dir / "worker-soak.log")
        try:
            ours = await sample_rss(worker, applied, n, interval)
        finally:
            worker.stop()
            await store.client.aclose()
        print("the empty faust agent starts (same topic, a group of its own)", flush=True)
        empty = settings.model_copy(update={"app_id": "soak-empty",
                                            "web_port": localstack.free_port()})
        progress = log_dir / "empty-soak.progress"
        progress.unlink(missing_ok=True)
        agent = benchkit.start_empty_agent(empty, log_dir / "empty-soak.log", progress)

        async def counted() -> int:
            p = benchkit.read_progress(progress)
            return p[0] if p else 0

        try:
            theirs = await sample_rss(agent, counted, n, min(interval, 1.0))
        finally:
            agent.stop()
        problems = benchkit.log_problems(log_dir / "worker-soak.log")
    print(benchkit.machine())
    print(f"RSS over {n:,} events ({customers:,} customers), target: the worker's RSS flat "
          "(the empty faust agent is the ceiling):")
    summary("rfm-stream worker", ours, n)
    summary("empty faust agent", theirs, n)
    active = [s for s in ours if s[1] > 0]
    if len(active) > 1 and active[-1][0] > active[0][0]:
        rate = (active[-1][1] - active[0][1]) / (active[-1][0] - active[0][0])
        print(f"  the issue's 10M-event run (--events 10000000) would take the worker "
              f"~{10_000_000 / rate / 60:.0f} minutes at this rate, plus the load")
    print("worker log: " + problems)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--customers", type=int, help="customers (default: events / 8)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--logs", help="keep the worker log in this directory")
    a = ap.parse_args()
    asyncio.run(main(a.events, a.customers or max(1, a.events // 8), a.interval, a.logs))
