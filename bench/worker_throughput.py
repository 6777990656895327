"""Worker throughput against its ceilings, in one run on one local stack: the CDNOW events
(69,659) in a topic of 4 partitions, read by

(a) a raw aiokafka consumer (``getmany``, no group, from the beginning to the high watermark;
    median of 3 timed passes after an untimed one),
(b) an empty faust agent (``bench/empty_agent.py``: the worker's faust settings, raw
    serializers, ``take_events(batch_max, within=0.05)``, concurrency 1, a consumer group of
    its own), a separate process stopped by its PID: the issue's ceiling,
(c) the same app with the worker's own batch delivery (``stream.fastpath``) and an empty
    handler: the ceiling of the worker's consuming path,
(d) the real worker (``rfm-stream worker``) into a fresh namespace and consumer group, or with
    ``--workers N`` N of them in that group (one process each, as N cores would run them);
    the load is a backlog of two years of event time, so the worker moves its partitions
    through event time together (``RFM_LIVE_MAX_SKEW_S``, a week: ~80 rounds, and the
    ~107,000 changes a live worker would have emitted),
(e) the same with ``RFM_LIVE_MAX_SKEW_S=0``: the partitions in fetch order (fewer, bigger
    steps and ~65,000-76,000 changes: the work measured before the alignment),

and prints events/s of each and the ratios against the target (worker >= 0.8x the empty
agent; stretch 15,000 events/s per worker, 30,000 for two). The worker's rate is also given
sustained, from 25% to 90% of the load applied (with several workers: after their joins and
the rebalance that splits the partitions). Prints figures; asserts nothing.

    make bench            # or: .venv/bin/python bench/worker_throughput.py [--runs 3] [--loop uvloop]
                          #     [--workers 2]

Timing of (b) to (e): from the first batch applied (the group join and that batch
excluded) to the last; (d) and (e) stop when Redis's last applied offset of every partition reaches
the end of the load and the outboxes are empty (every change published by the worker's outbox
relay, ``stream/relay.py``). ``--loop uvloop`` runs all of them on uvloop, if it is installed. About
40-50 s per run with the worker at ~2,000-3,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import benchkit

from stream import cdnow, localstack
from stream.demo import ensure_topics, load_cdnow, local_settings
from stream.kafka_io import bootstrap_of
from stream.runner import store_for
from stream.settings import Settings

TARGET_RATIO = 0.8
STRETCH = 15_000


async def worker_rate(settings: Settings, targets: dict[int, int], total: int, log_paths: list[Path],
                      loop: str) -> tuple[float, float]:
    """Events/s of ``len(log_paths)`` real workers in one consumer group: from the first applied
    batch to the last event applied with every change published, and sustained (from 25% to
    90% of the load applied: with several workers, after their joins and the rebalance that
    splits the partitions)."""
    store = store_for(settings)
    workers = [benchkit.start_worker(settings if i == 0 else settings.model_copy(
        update={"web_port": localstack.free_port()}), path, loop)
        for i, path in enumerate(log_paths)]
    marks: dict[float, float] = {}
    try:
        started = None
        while True:
            meta = await store.partition_meta(targets)
            applied = sum(off + 1 for off, _ in meta.values())
            now = time.perf_counter()
            if started is None and applied > 0:
                started, first_applied = now, applied
            for share in (0.25, 0.9):
                if share not in marks and applied >= share * total:
                    marks[share] = now
            # the end: every record applied and every change published (the outbox relay,
            # a process of its own, may trail the worker)
            if all(meta[p][0] >= t for p, t in targets.items()) \
                    and not await store.outbox_depth(targets):
                break
            for worker in workers:
                if not worker.alive():
                    raise RuntimeError(worker.log_tail())
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.stop()
        await store.client.aclose()
    sustained = 0.65 * total / max(1e-9, marks[0.9] - marks[0.25])
    return (total - first_applied) / elapsed, sustained


async def one_run(stack: localstack.LocalStack, run: int, topic: str, targets: dict[int, int],
                  total: int, log_dir: Path, loop: str, workers: int) -> dict[str, float]:
    settings = local_settings(stack, namespace=f"bench{run}", app_id=f"rfm-bench{run}",
                              purchases_topic=topic, dead_letter_topic=f"bench{run}-dlq",
                              segment_changes_topic=f"bench{run}-changes",
                              customer_segments_topic=f"bench{run}-segments")
    await ensure_topics(settings)
    raw = benchkit.median(await benchkit.raw_consume_rates(bootstrap_of(settings.kafka_url), topic))
    empty_settings = settings.model_copy(update={"app_id": f"bench-empty{run}",
                                                 "web_port": localstack.free_port()})
    empty = await benchkit.empty_agent_rate(empty_settings, total, log_dir / f"empty{run}.log",
                                            log_dir / f"empty{run}.progress", loop)
    batch_settings = settings.model_copy(update={"app_id": f"bench-batch{run}",
                                                 "web_port": localstack.free_port()})
    batch = await benchkit.empty_agent_rate(batch_settings, total, log_dir / f"batch{run}.log",
                                            log_dir / f"batch{run}.progress", loop, "batch")
    worker, sustained = await worker_rate(settings, targets, total, worker_logs(log_dir, run, workers),
                                          loop)
    # the same load in fetch order: no event-time alignment of the partitions (fewer and
    # bigger steps, fewer changes: the work of the figures before alignment)
    fetch_order = settings.model_copy(update={
        "namespace": f"bench{run}f", "app_id": f"rfm-bench{run}f", "live_max_skew_s": 0,
        "web_port": localstack.free_port()})
    unaligned, _ = await worker_rate(fetch_order, targets, total,
                                     worker_logs(log_dir, run, workers, "f"), loop)
    return {"raw": raw, "empty": empty, "batch": batch, "worker": worker, "sustained": sustained,
            "unaligned": unaligned}


def worker_logs(log_dir: Path, run: int, workers: int, variant: str = "") -> list[Path]:
    return [log_dir / (f"worker{run}{variant}.log" if i == 0 else f"worker{run}{variant}-{i}.log")
            for i in range(workers)]


async def main(runs: int, loop: str, logs: str | None, workers: int) -> None:
    rows = sorted(cdnow.read_rows(), key=lambda r: r.day)
    results = []
    with tempfile.TemporaryDirectory() as tmp, localstack.running(Path(tmp)) as stack:
        log_dir = Path(logs or tmp)
        first = local_settings(stack, purchases_topic="bench-purchases")
        await ensure_topics(first)
        targets = await load_cdnow(first, rows, show=False)
        for run in range(runs):
            results.append(await one_run(stack, run, first.purchases_topic, targets, len(rows),
                                         log_dir, loop, workers))
            print(f"  run {run + 1}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in results[-1].items()),
                  flush=True)
        problems = [benchkit.log_problems(path) for r in range(runs) for v in ("", "f")
                    for path in worker_logs(log_dir, r, workers, v)]
        loops = {benchkit.loop_of(log_dir / f"{who}{r}.log") for who in ("worker", "empty", "batch")
                 for r in range(runs)}
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}

    def ratio(a: str, b: str) -> float:  # median of the per-run ratios (same run, same load)
        return statistics.median(r[a] / r[b] for r in results)

    print(benchkit.machine())
    print(f"throughput, CDNOW {len(rows):,} events, {first.partitions} partitions, one process "
          f"each, event loop {'/'.join(sorted(loops))} (faust banners), batch_max "
          f"{first.batch_max}; {runs} run(s), medians:")
    print(f"  raw aiokafka getmany      {med['raw']:>10,.0f} events/s")
    print(f"  empty faust agent         {med['empty']:>10,.0f} events/s")
    print(f"  empty batch handler       {med['batch']:>10,.0f} events/s  (the worker's "
          "stream.fastpath, doing nothing)")
    who = "rfm-stream worker" if workers == 1 else f"rfm-stream workers x{workers}"
    print(f"  {who:<26}{med['worker']:>10,.0f} events/s  (sustained from 25% to 90% of the "
          f"load: {med['sustained']:,.0f})")
    print(f"  {'the same, in fetch order':<26}{med['unaligned']:>10,.0f} events/s  "
          "(RFM_LIVE_MAX_SKEW_S=0: partitions not aligned in event time)")
    print("ratios (median of per-run ratios):")
    for key, name in (("worker", "worker"), ("unaligned", "in fetch order")):
        w_e = ratio(key, "empty")
        if workers == 1:
            print(f"  {name + ' / empty faust agent':<29}{w_e:6.3f}   target >= {TARGET_RATIO} "
                  f"({'met' if w_e >= TARGET_RATIO else 'not met'})")
        else:  # the target is for one worker process
            print(f"  {name + ' / empty faust agent':<29}{w_e:6.3f}   (the target is for one "
                  "worker)")
    print(f"  worker / empty batch handler {ratio('worker', 'batch'):6.3f}")
    print(f"  worker / raw aiokafka        {ratio('worker', 'raw'):6.3f}")
    print(f"  empty agent / raw aiokafka   {ratio('empty', 'raw'):6.3f}")
    print(f"  empty batch / raw aiokafka   {ratio('batch', 'raw'):6.3f}")
    stretch = STRETCH * workers  # the issue: 15,000/s for one, 30,000 for two
    print(f"  worker{'s' if workers > 1 else ''} / stretch {stretch:,}/s    "
          f"{med['worker'] / stretch:6.3f}")
    print("worker logs: " + ("; ".join(p for p in problems if "no ERROR" not in p)
                             or "no ERROR/CRITICAL/Traceback lines"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs; figures are medians")
    ap.add_argument("--loop", choices=benchkit.LOOPS, default="aio",
                    help="event loop of the empty agent, the worker and the raw consumer")
    ap.add_argument("--logs", help="keep the worker and agent logs in this directory")
    ap.add_argument("--workers", type=int, default=1,
                    help="worker processes in the group (the stretch: 15,000/s for one, "
                    "30,000 for two)")
    args = ap.parse_args()
    benchkit.check_loop(args.loop)
    benchkit.run(main(args.runs, args.loop, args.logs, args.workers), args.loop)
