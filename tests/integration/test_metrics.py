"""Metrics: the number of series does not grow with the data, and a real Prometheus server
scrapes a running worker and answers a query about it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client import generate_latest

from stream import localstack
from stream.demo import ensure_topics
from stream.kafka_io import Message, bootstrap_of, produce
from stream.pipeline import RawRecord
from stream.runner import start_worker, store_for, wait_applied
from stream.services import build_services

NOW = 1_800_000_000_000


def event(n: int, customer: str, day: int, kind: str = "purchase") -> bytes:
    return json.dumps({"event_id": f"e{n}", "customer_id": customer, "order_id": f"o{n % 7}",
                       "type": kind, "amount": f"{1 + n % 500}.00", "currency": "USD",
                       "occurred_at": f"2024-{1 + day // 28:02d}-{1 + day % 28:02d}T00:00:00Z"}
                      ).encode()


def series(registry) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#")]


async def test_series_count_is_the_same_after_10_and_10000_customers(settings):
    services = build_services(settings.model_copy(update={"partitions": 2}))
    proc = services.processor
    try:
        offsets = {0: 0, 1: 0}

        async def feed(first: int, n: int) -> None:
            for start in range(first, first + n, 1000):
                batch: dict[int, list[RawRecord]] = {0: [], 1: []}
                for i in range(start, min(first + n, start + 1000)):
                    p = i % 2
                    value = event(i, f"c{i}", (i // 40) % 300, "refund" if i % 13 == 0 else
                                  "purchase")
                    if i % 97 == 0:
                        value = b"{broken"
                    batch[p].append(RawRecord("purchases", p, offsets[p], f"c{i}".encode(),
                                              value))
                    offsets[p] += 1
                for p, recs in batch.items():
                    if recs:
                        await proc.process(p, recs, now_ms=NOW)

        await feed(0, 10)
        small = series(services.metrics.registry)
        await feed(10, 9_990)
        large = series(services.metrics.registry)
    finally:
        await services.store.client.aclose()
    assert len(small) == len(large) > 100
    assert sorted(small) == sorted(large)
    assert not any("c1" in s for s in large)  # never a customer id in a label


async def test_a_restarted_worker_shows_the_model_version_in_force_before_any_step(settings):
    """The model version gauge of a new worker's services, started on a namespace whose
    trainer published snapshots, reads the stored snapshot's version at once (it read 0 until
    the worker's first step)."""
    tuned = settings.model_copy(update={"partitions": 1, "threshold_refresh_every": 50,
                                        "cluster_min_customers": 20, "min_population": 20})
    first = build_services(tuned)
    try:
        await first.processor.process(0, [RawRecord("purchases", 0, i, f"c{i % 90}".encode(),
                                                    event(i, f"c{i % 90}", i // 4))
                                          for i in range(400)], now_ms=NOW)
        version = json.loads(await first.store.load_model() or "{}").get("version")
    finally:
        await first.store.client.aclose()
    assert isinstance(version, int) and version >= 2
    again = build_services(tuned)
    try:
        gauge = lambda: again.metrics.registry.get_sample_value("rfm_model_version")  # noqa: E731
        assert gauge() == 0
        await again.start()
        assert gauge() == version
    finally:
        await again.store.client.aclose()


@pytest.mark.timeout(300)
async def test_a_real_prometheus_scrapes_the_worker(settings, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed: .ci/run installs Debian's package")
        pytest.skip("the prometheus binary is absent (Debian package 'prometheus'); CI runs it")
    await ensure_topics(settings)
    msgs = [Message(f"c{i}".encode(), event(i, f"c{i}", i)) for i in range(50)]
    targets = await produce(bootstrap_of(settings.kafka_url), settings.purchases_topic, msgs)
    worker = start_worker(settings, tmp_path / "worker.log")
    store = store_for(settings)
    port = localstack.free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: rfm-stream\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{settings.web_port}']}}]\n")
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
            stderr=log, start_new_session=True)
    try:
        await wait_applied(store, targets, [worker], timeout_s=120)
        query = urllib.parse.urlencode({"query": "rfm_events_applied_total"})
        deadline, value = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}",
                                            timeout=5) as resp:
                    result = json.loads(resp.read())["data"]["result"]
                if result and float(result[0]["value"][1]) >= 50:
                    value = float(result[0]["value"][1])
                    break
            except OSError:
                pass
            await asyncio.sleep(1)
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        worker.stop()
        await store.client.aclose()
    assert value == 50, (tmp_path / "prometheus.log").read_text()[-2000:]
