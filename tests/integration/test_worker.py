"""A real faust worker process against the real broker and Redis: malformed records land on
the dead-letter topic with their reason while later records are processed; the same purchase
published twice (two offsets) counts once; /metrics serves Prometheus text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import orjson
from pydantic import SecretStr

import stream
from stream.demo import ensure_topics
from stream.kafka_io import Message, bootstrap_of, produce, read_all
from stream.runner import start_worker, store_for, wait_applied


def event(n: int, customer: str, amount: str = "10.00") -> dict:
    return {"event_id": f"e{n}", "customer_id": customer, "order_id": f"o{n}",
            "type": "purchase", "amount": amount, "currency": "USD",
            "occurred_at": f"2024-01-{1 + n % 28:02d}T00:00:00Z"}


def consumption_report(metrics: str, log_path) -> str:
    """What explains a consumed count: the counters of records and the worker's log lines
    about seeks, gaps, retries and rebalances (printed when the count is not the expected)."""
    counters = [line for line in metrics.splitlines() if re.match(
        r"rfm_(events_[a-z]+_total|duplicates_skipped_total|dead_lettered_total|applied_offset)",
        line)]
    events = [line for line in log_path.read_text().splitlines() if re.search(
        r"seek|re-read|retrying|another writer|unavailable|failed|revoked|assigned|rebalanc",
        line, re.IGNORECASE)]
    return "\n".join(["metrics:", *counters, "worker log:", *events[-60:]])


async def test_dead_letters_duplicates_and_metrics(settings, tmp_path):
    await ensure_topics(settings)
    good = [event(i, f"c{i % 7}") for i in range(30)]
    bad = [
        Message(b"c1", b"this is not json"),
        Message(b"c2", orjson.dumps({k: v for k, v in event(100, "c2").items()
                                     if k != "customer_id"})),
        Message(b"c3", orjson.dumps(event(101, "c3", amount="-3.00"))),
        Message(b"c4", b"\x01" * 200_000),  # its dead letter must still fit in a record
        Message(b"c5", orjson.dumps({**event(102, "c5"), "occurred_at": "0001-01-01T00:30:00+01:00"})),
    ]
    msgs = [Message(e["customer_id"].encode(), orjson.dumps(e)) for e in good[:15]]
    msgs += bad
    msgs += [Message(e["customer_id"].encode(), orjson.dumps(e)) for e in good[15:]]
    msgs += [Message(e["customer_id"].encode(), orjson.dumps(e)) for e in good[:10]]  # again
    msgs.append(Message(b"ab{c}/d", orjson.dumps(event(200, "ab{c}/d"))))
    boot = bootstrap_of(settings.kafka_url)
    targets = await produce(boot, settings.purchases_topic, msgs)
    # producers may compress their record batches (Java clients often use lz4 or zstd)
    codecs = ("gzip", "snappy", "lz4", "zstd")
    for n, codec in enumerate(codecs):
        e = event(300 + n, f"z-{codec}", amount="5.00")
        more = await produce(boot, settings.purchases_topic,
                             [Message(e["customer_id"].encode(), orjson.dumps(e))],
                             compression=codec)
        targets = {p: max(targets.get(p, -1), more.get(p, -1)) for p in {*targets, *more}}

    # a short processing timeout: faust's consumer thread logs partitions whose records wait
    # unprocessed that long; batch delivery must tell its monitor they are being processed
    settings = settings.model_copy(update={"http_token": SecretStr("s3cret"),
                                           "stream_processing_timeout_s": 0.5})
    worker = start_worker(settings, tmp_path / "worker.log")
    store = store_for(settings)
    base = f"http://127.0.0.1:{settings.web_port}"

    def get(path: str, token: str | None = "s3cret") -> tuple[int, bytes]:
        req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    try:
        await wait_applied(store, targets, [worker], timeout_s=120)
        metrics = get("/metrics")[1].decode()
        c3 = json.loads(get("/customers/c3")[1])
        odd = json.loads(get("/customers/ab%7Bc%7D%2Fd")[1])
        # the bearer token guards everything but /health
        denied = [get(path, token)[0] for path in ("/metrics", "/customers/c3", "/segments",
                                                   "/ready") for token in (None, "wrong")]
        health = get("/health", None)[0]
    finally:
        exit_code = worker.stop()
        customers = {}
        for p in range(settings.partitions):
            async for page in store.iter_customers(p):
                customers.update({c.customer_id: c.state for c in page})
        await store.client.aclose()

    dead = [json.loads(v) for *_, v in await read_all(boot, settings.dead_letter_topic)]
    assert sorted(d["reason"] for d in dead) == [
        "invalid_amount", "invalid_timestamp", "missing_field", "not_json", "oversized"]
    big = next(d for d in dead if d["reason"] == "oversized")
    assert big["value_truncated"] and big["value_encoding"] == "utf-8" and "200000" in big["detail"]
    assert all(d["source_topic"] == settings.purchases_topic and d["source_offset"] >= 0
               for d in dead)
    assert any(d["value"] == "this is not json" for d in dead)

    # oracle: each good event once (the repeated 10 do not count again)
    for cid in {e["customer_id"] for e in good}:
        mine = [e for e in good if e["customer_id"] == cid]
        assert customers[cid].frequency == len(mine)
        assert customers[cid].monetary_minor == 1000 * len(mine)
    assert c3["frequency"] == len([e for e in good if e["customer_id"] == "c3"])
    # readable units, hand-worked: c3's purchases are events 3, 10, 17 and 24 (10.00 USD each,
    # on 2024-01-(1 + n % 28)); the strategy is the shipped table's for its segment
    assert (c3["monetary"], c3["currency"], c3["first_purchase_at"], c3["last_purchase_at"]) == (
        "40.00", "USD", "2024-01-04T00:00:00Z", "2024-01-25T00:00:00Z")
    shipped = tomllib.loads((Path(stream.__file__).parent / "segments.toml").read_text())
    assert c3["strategy"] == next(s["strategy"] for s in shipped["segment"]
                                  if s["name"] == c3["segment"])
    assert odd["frequency"] == 1 and odd["customer_id"] == "ab{c}/d"
    assert [(customers[f"z-{c}"].frequency, customers[f"z-{c}"].monetary_minor)
            for c in codecs] == [(1, 500)] * len(codecs)

    assert 'rfm_dead_lettered_total{reason="not_json"} 1.0' in metrics
    # a record fetched before the seek to Redis's offsets on assignment can arrive again (in
    # about 3 runs of 8, all 46 do): it is read twice (consumed) and skipped by its offset the
    # second time, a record that became a dead letter included
    again = float(re.search(r'rfm_duplicates_skipped_total\{kind="offset"\} ([0-9.]+)',
                            metrics).group(1))
    consumed = float(re.search(r"^rfm_events_consumed_total ([0-9.e+]+)$", metrics,
                               re.MULTILINE).group(1))
    assert consumed == 46 + len(codecs) + again, \
        consumption_report(metrics, tmp_path / "worker.log")
    assert 'rfm_duplicates_skipped_total{kind="event_id"} 10.0' in metrics
    assert not re.search(r'"(c\d|ab\{c\}/d)"', metrics)  # no customer id in any label
    assert denied == [401] * 8 and health == 200

    changes = [json.loads(v) for *_, v in await read_all(boot, settings.segment_changes_topic)]
    assert {c["customer_id"] for c in changes} == ({f"c{i}" for i in range(7)} | {"ab{c}/d"}
                                                 | {f"z-{c}" for c in codecs})
    first_seen: dict[str, dict] = {}
    for c in changes:
        first_seen.setdefault(c["customer_id"], c)
    assert all(c["previous"] is None for c in first_seen.values())
    assert len({c["change_id"] for c in changes}) == len(changes)
    assert exit_code == 0, worker.log_tail()
    log_text = (tmp_path / "worker.log").read_text()
    assert "has not started processing" not in log_text
    assert "has stopped processing" not in log_text

    # the compacted customer-segments topic: each customer's latest value is its present segment
    present = {}
    for _, _, key, value in await read_all(boot, settings.customer_segments_topic, idle_s=0.5):
        present[key.decode()] = json.loads(value)["current"]["segment"]
    assert present == {cid: c["current"]["segment"] for cid, c in
                       {c["customer_id"]: c for c in changes}.items()}


async def test_a_topic_with_other_than_rfm_partitions_stops_the_worker(settings, tmp_path):
    await ensure_topics(settings)  # settings.partitions (4) partitions
    wrong = settings.model_copy(update={"partitions": 2})
    e = event(1, "c1")
    await produce(bootstrap_of(settings.kafka_url), settings.purchases_topic,
                  [Message(b"c1", orjson.dumps(e))])
    worker = start_worker(wrong, tmp_path / "worker.log")
    try:
        # faust's shutdown after a crash can take a minute on a loaded machine (it cancels
        # the consumer thread's calls and stops every service): wait for the exit, not a time
        for _ in range(360):
            if not worker.alive():
                break
            await asyncio.sleep(0.5)
        alive = worker.alive()
    finally:
        worker.stop()
    assert not alive, worker.log_tail()
    assert "has 4 partitions but RFM_PARTITIONS is 2" in (tmp_path / "worker.log").read_text()


async def test_a_worker_stopped_with_sigterm_leaves_its_consumer_group(settings, tmp_path):
    """A stopped worker tells the broker it leaves (LeaveGroup), so the group's other workers
    take its partitions over at their next heartbeat, not after its session timeout. aiokafka
    leaves only from a generation above 0, which Kafka's first one is; the local broker's is 0
    (``stream.fastpath.leave_group_from_generation_zero``): a fresh user's two workers started
    together on a new stack never left, and one's partitions moved after ~45 s, not ~17 s."""
    from aiokafka.admin import AIOKafkaAdminClient

    await ensure_topics(settings)
    worker = start_worker(settings, tmp_path / "worker.log")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_of(settings.kafka_url))
    await admin.start()
    try:
        deadline = asyncio.get_running_loop().time() + 120
        while True:  # the worker has joined and been given its partitions
            with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(
                    f"http://127.0.0.1:{settings.web_port}/ready", timeout=2) as r:
                if json.loads(r.read())["partitions"]:
                    break
            assert asyncio.get_running_loop().time() < deadline, worker.log_tail()
            await asyncio.sleep(0.5)
        [joined] = (await admin.describe_consumer_groups([settings.app_id]))[0].groups
        assert len(joined[5]) == 1  # (error, group, state, protocol type, protocol, members)
        assert worker.stop() == 0
        [left] = (await admin.describe_consumer_groups([settings.app_id]))[0].groups
    finally:
        worker.stop()
        await admin.close()
    assert left[5] == [] and left[2] == "Empty", left


async def test_a_restarted_worker_shows_its_applied_offsets_before_any_new_batch(settings,
                                                                               tmp_path):
    """``rfm_applied_offset`` is Redis's last applied offset of each owned partition from
    the assignment on: a fresh user saw 0 for every partition after a restart on a quiet
    topic (the gauge was set only by batches), which reads as lost state."""
    await ensure_topics(settings)
    msgs = [Message(f"c{i}".encode(), orjson.dumps(event(i, f"c{i}"))) for i in range(40)]
    targets = await produce(bootstrap_of(settings.kafka_url), settings.purchases_topic, msgs)
    store = store_for(settings)
    worker = start_worker(settings, tmp_path / "first.log")
    try:
        await wait_applied(store, targets, [worker], timeout_s=120)
    finally:
        worker.stop()
    worker = start_worker(settings, tmp_path / "second.log")
    expected = {str(p): float(o) for p, o in targets.items()}
    shown: dict[str, float] = {}
    try:
        deadline = asyncio.get_running_loop().time() + 120
        while shown != expected:
            assert asyncio.get_running_loop().time() < deadline, (shown, expected)
            await asyncio.sleep(0.5)
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{settings.web_port}/metrics", timeout=2) as r:
                    text = r.read().decode()
                shown = {m[1]: float(m[2]) for m in re.finditer(
                    r'^rfm_applied_offset\{partition="(\d+)"\} (\S+)$', text, re.MULTILINE)}
                shown = {p: v for p, v in shown.items() if p in expected}
        applied = {str(p): float(o) for p, (o, _) in
                   (await store.partition_meta(list(targets))).items()}
    finally:
        worker.stop()
        await store.client.aclose()
    assert applied == expected  # nothing new was applied: the gauge came from the assignment
