"""Two real worker processes in one consumer group: as the global watermark passes day 31 of
a customer's only purchase, exactly one inactivity change reaches the segment-changes topic
(whichever worker owns the customer's partition; the other partition's progress moves the
watermark)."""

from __future__ import annotations

import asyncio
import json
import time

import orjson
import pytest

from stream import localstack
from stream.demo import ensure_topics
from stream.kafka_io import Message, bootstrap_of, produce, read_all
from stream.runner import start_worker, store_for, wait_applied
from stream.services import partition_for

pytestmark = pytest.mark.timeout(300)


def names_on(partition: int, partitions: int, n: int, prefix: str) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        if partition_for(f"{prefix}{i}", partitions) == partition:
            out.append(f"{prefix}{i}")
        i += 1
    return out


def message(n: int, customer: str, day: str) -> Message:
    value = {"event_id": f"e{n}", "customer_id": customer, "order_id": f"o{n}",
             "type": "purchase", "amount": "10.00", "currency": "USD",
             "occurred_at": f"{day}T00:00:00Z"}
    return Message(customer.encode(), orjson.dumps(value))


async def test_two_workers_emit_exactly_one_inactivity_change(settings, tmp_path):
    s = settings.model_copy(update={"partitions": 2, "scoring_mode": "fixed",
                                    "sweep_interval_s": 0.5})
    await ensure_topics(s)
    x = names_on(partition_for("x", 2), 2, 1, "x")[0]
    others = {p: names_on(p, 2, 4, f"p{p}-") for p in (0, 1)}
    days = ["2024-01-11", "2024-01-31", "2024-02-01", "2024-02-02"]  # days 10, 30, 31, 32
    msgs = [message(0, x, "2024-01-01")]
    for i, day in enumerate(days):
        msgs += [message(10 * (i + 1) + p, others[p][i], day) for p in (0, 1)]
    a = start_worker(s, tmp_path / "a.log")
    b = start_worker(s.model_copy(update={"web_port": localstack.free_port()}), tmp_path / "b.log")
    store = store_for(s)
    try:
        targets = await produce(bootstrap_of(s.kafka_url), s.purchases_topic, msgs)
        await wait_applied(store, targets, [a, b], timeout_s=180)
        deadline = time.monotonic() + 60
        while True:  # the sweep timer may fire it after the last batch
            changes = [json.loads(v) for *_, v in await read_all(
                bootstrap_of(s.kafka_url), s.segment_changes_topic, idle_s=1.0)]
            mine = [c for c in changes if c["customer_id"] == x and c["cause"] == "inactivity"]
            if mine or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # time for a second (wrong) one to show up
        changes = [json.loads(v) for *_, v in await read_all(
            bootstrap_of(s.kafka_url), s.segment_changes_topic, idle_s=1.0)]
    finally:
        a.stop()
        b.stop()
        await store.client.aclose()
    mine = [c for c in changes if c["customer_id"] == x]
    assert [(c["cause"], c["current"]["segment"]) for c in mine] == [
        ("purchase", "New Customers"), ("inactivity", "Promising")], mine
    # due on day 31; scored at the global watermark then (day 31, or 32 when this partition
    # had already reached day 32 when the other one passed day 31)
    assert mine[1]["occurred_at"].startswith("2024-02-01")
    assert mine[1]["as_of"][:10] in ("2024-02-01", "2024-02-02")
    assert mine[1]["recency_days"] in (31, 32)
