"""Fuzz: arbitrary bytes, arbitrary JSON and mutated events thrown at a real worker. It never
stops, and every record is either applied or dead-lettered (exactly one of the two)."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stream.demo import ensure_topics, local_settings
from stream.kafka_io import Message, bootstrap_of, produce, read_all
from stream.runner import start_worker, store_for, wait_applied

_runs = itertools.count()
GOOD = {"event_id": "e", "customer_id": "c", "order_id": "o", "type": "purchase",
        "amount": "1.00", "currency": "USD", "occurred_at": "2024-01-01T00:00:00Z"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


@st.composite
def mutated_event(draw, n):
    body = dict(GOOD, event_id=f"e{n}", customer_id=draw(st.sampled_from(["a", "b", "ab{c}", "é"])),
                order_id=f"o{n}")
    for field in draw(st.lists(st.sampled_from(sorted(GOOD)), max_size=2, unique=True)):
        if draw(st.booleans()):
            body.pop(field)
        else:
            body[field] = draw(json_values)
    if draw(st.booleans()):
        body["amount"] = draw(st.sampled_from(["0", "12.5", "1e400", "-0", "0.001", 7, 1e-7]))
    key = body.get("customer_id") if draw(st.booleans()) else draw(st.text(max_size=5))
    return Message(None if key is None else str(key).encode("utf-8", "surrogatepass"),
                   orjson.dumps(body))


def record(n):
    return st.one_of(
        st.builds(Message, st.none() | st.binary(max_size=8), st.binary(max_size=300)),
        st.builds(lambda k, v: Message(k, orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS)),
                  st.binary(max_size=8), json_values),
        mutated_event(n),
    )


records = st.lists(st.integers(0, 10**9), min_size=150, max_size=250).flatmap(
    lambda ns: st.tuples(*[record(i) for i in range(len(ns))]))


@given(batch=records)
@settings(max_examples=2, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_every_record_is_applied_or_dead_lettered(stack, batch, tmp_path_factory):
    n = next(_runs)

    s = local_settings(stack, namespace=f"fuzz{n}", app_id=f"rfm-fuzz{n}",
                       purchases_topic=f"fuzz{n}-purchases", dead_letter_topic=f"fuzz{n}-dlq",
                       segment_changes_topic=f"fuzz{n}-changes",
                       customer_segments_topic=f"fuzz{n}-segments", partitions=2)
    good = Message(b"sentinel", orjson.dumps(dict(GOOD, customer_id="sentinel")))
    msgs = [*batch, good]

    async def run():
        await ensure_topics(s)
        targets = await produce(bootstrap_of(s.kafka_url), s.purchases_topic, msgs)
        worker = start_worker(s, tmp_path_factory.mktemp("fuzz") / "worker.log")
        store = store_for(s)
        try:
            await wait_applied(store, targets, [worker], timeout_s=120)
            alive = worker.alive()
            with urllib.request.urlopen(f"http://127.0.0.1:{s.web_port}/metrics",
                                        timeout=10) as resp:
                metrics = resp.read().decode()
            found = [await store.read_customer(p, "sentinel") for p in range(s.partitions)]
            sentinel = next((c for c in found if c is not None), None)
        finally:
            worker.stop()
            await store.client.aclose()
        dead = [json.loads(v) for *_, v in await read_all(bootstrap_of(s.kafka_url),
                                                          s.dead_letter_topic, idle_s=1.0)]
        return alive, metrics, sentinel, dead, targets

    alive, metrics, sentinel, dead, targets = asyncio.run(run())
    assert alive
    assert sentinel is not None and sentinel.state.frequency == 1
    total = sum(o + 1 for o in targets.values())
    assert total == len(msgs)
    dead_at = {(d["source_partition"], d["source_offset"]) for d in dead}
    assert len(dead_at) == len(dead)  # no record dead-lettered twice
    applied = _metric(metrics, "rfm_events_applied_total")
    duplicates = _metric(metrics, 'rfm_duplicates_skipped_total{kind="event_id"}')
    assert applied + duplicates + len(dead) == total
    assert all(d["reason"] != "processing_error" for d in dead), dead


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
