"""Load and replay against the real broker and Redis: an Online-Retail file loads into exactly
the documented state (pandas oracle); a replay of a live topic rebuilds the live state and
change stream; the CLI's customer, segments, export and forget commands."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
from datetime import UTC
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from click.testing import CliRunner

from state.keys import alias_key
from stream import cdnow
from stream.cli import main
from stream.demo import cdnow_messages, ensure_topics, run_to_completion
from stream.kafka_io import BatchSender, bootstrap_of, create_topics, produce, read_all
from stream.loaders import LoadOptions, load_file
from stream.outbox import OutboxPublisher
from stream.replay import load, replay
from stream.runner import resolve_namespace, store_for

pytestmark = pytest.mark.timeout(600)
DATA = Path(__file__).parent.parent / "data"


def retail_oracle(path: Path) -> dict[str, tuple[int, int, int | None]]:
    """The documented rules with pandas: customer -> (frequency, monetary cents, last ms)."""
    df = pd.read_csv(path, dtype={"InvoiceNo": str, "CustomerID": str}).drop_duplicates()
    df = df[df["CustomerID"].notna() & ~df["InvoiceNo"].str.startswith("A")]
    df["customer"] = df["CustomerID"].str.replace(r"\.0$", "", regex=True)
    cancel = df["InvoiceNo"].str.startswith("C")
    df = df[cancel | (df["Quantity"] > 0)]
    cancel = df["InvoiceNo"].str.startswith("C")
    df["cents"] = (df["Quantity"].abs() * df["UnitPrice"] * 100).round().astype(int)
    t = pd.to_datetime(df["InvoiceDate"], format="%m/%d/%Y %H:%M").dt.tz_localize(UTC)
    df["ms"] = (t - pd.Timestamp(0, tz=UTC)) // pd.Timedelta(milliseconds=1)
    sales, refunds = df[~cancel], df[cancel]
    out = {}
    for cid in df["customer"].unique():
        s, r = sales[sales["customer"] == cid], refunds[refunds["customer"] == cid]
        out[cid] = (s["InvoiceNo"].nunique(), max(0, int(s["cents"].sum() - r["cents"].sum())),
                    int(s["ms"].max()) if len(s) else None)
    return out


async def stored_state(settings, namespace):
    """Partition 0 of a namespace: its customers by id, the model snapshot, segment counts."""
    store = store_for(settings.model_copy(update={"namespace": namespace}))
    try:
        out = {}
        async for page in store.iter_customers(0):
            out.update({c.customer_id: c for c in page})
        return out, await store.load_model(), await store.segment_counts([0])
    finally:
        await store.client.aclose()


async def test_online_retail_file_loads_into_the_documented_state(settings, tmp_path):
    s = settings.model_copy(update={"partitions": 2, "currency": "GBP"})
    await ensure_topics(s)
    path = DATA / "online_retail_sample.csv"
    rows = list(load_file(path, LoadOptions("online-retail", "UTC", "GBP", 2)))
    summary = await load(s, rows)
    assert (summary.rows, summary.events, summary.rejected) == (14, 10, {
        "duplicate_row": 1, "missing_customer_id": 1, "adjustment": 1, "invalid_quantity": 1})
    again = await load(s, list(load_file(path, LoadOptions("online-retail", "UTC", "GBP", 2))))
    assert again.events == 10  # the same ids again: applied once
    result = await replay(s, s.namespace + "-rebuilt", changes_topic=s.namespace + "-replayed")
    assert (result.records, result.applied, result.dead_letters) == (20, 10, 0)
    store = store_for(s.model_copy(update={"namespace": s.namespace + "-rebuilt"}))
    try:
        got = {}
        for p in (0, 1):
            async for page in store.iter_customers(p):
                got.update({c.customer_id: (c.state.frequency, c.state.monetary_minor,
                                            c.state.last_purchase_ms) for c in page})
    finally:
        await store.client.aclose()
    assert got == retail_oracle(path)
    # hand-worked from the sample's rows of 14527: 34.80 + 25.50 - 27.50 (the discount), the
    # last purchase 2010-12-03 11:30 UTC (its row's date, in the file's time zone UTC)
    assert got["14527"] == (2, 3280, 1291375800000)
    changes = [json.loads(v) for *_, v in await read_all(bootstrap_of(s.kafka_url),
                                                         s.namespace + "-replayed", idle_s=1.0)]
    assert changes and all(c["replay"] for c in changes)
    assert {c["customer_id"] for c in changes} == {"17850", "13047", "14527"}
    # from an event time: the earlier records only advance the offsets
    late = await replay(s, s.namespace + "-late", from_ms=1291248000000)  # 2010-12-02 UTC
    assert (late.records, late.skipped_before_from, late.applied) == (20, 14, 3)


async def test_replay_rebuilds_the_live_state_and_changes(settings, tmp_path):
    s = settings.model_copy(update={"partitions": 1})
    await ensure_topics(s)
    rows = sorted(cdnow.read_rows(), key=lambda r: r.day)[:6_000]
    targets = await produce(bootstrap_of(s.kafka_url), s.purchases_topic, cdnow_messages(rows))
    await run_to_completion(s, targets, tmp_path / "live.log", show=False)
    new = s.namespace + "-replay"
    result = await replay(s, new, changes_topic=new + "-changes", switch=True)
    assert result.applied == 6_000

    live, replayed = await stored_state(s, s.namespace), await stored_state(s, new)
    assert len(live[0]) > 2_000

    async def await_read(topic):
        return await read_all(bootstrap_of(s.kafka_url), topic, idle_s=1.0)

    live_changes = [{k: v for k, v in json.loads(v).items() if k not in ("emitted_at", "replay")}
                    for *_, v in await await_read(s.segment_changes_topic)]
    replay_changes = [json.loads(v) for *_, v in await await_read(new + "-changes")]
    assert all(c.pop("replay") for c in replay_changes)
    for c in replay_changes:
        c.pop("emitted_at")
    first = next((i for i, (a, b) in enumerate(zip(live_changes, replay_changes, strict=False))
                  if a != b), None)
    assert first is None, (first, len(live_changes), len(replay_changes), {
        k: (live_changes[first][k], replay_changes[first].get(k)) for k in live_changes[first]
        if live_changes[first][k] != replay_changes[first].get(k)})
    assert replay_changes == live_changes
    diff = [(live[0].get(c), replayed[0].get(c)) for c in set(live[0]) | set(replayed[0])
            if live[0].get(c) != replayed[0].get(c)]
    assert not diff, (len(diff), diff[:2])
    assert replayed == live  # state, published segments and clusters, model, counts
    assert resolve_namespace(s).namespace == new  # --switch

    # the CLI on the rebuilt namespace (through the alias)
    env = {"RFM_KAFKA_URL": s.kafka_url, "RFM_REDIS_URL": s.redis_url.get_secret_value(),
           "RFM_NAMESPACE": s.namespace, "RFM_PARTITIONS": "1",
           "RFM_CUSTOMER_SEGMENTS_TOPIC": s.customer_segments_topic}
    runner = CliRunner()

    async def cli(*args):  # the commands run their own event loop: not on this one
        return await asyncio.to_thread(runner.invoke, main, list(args), env=env)

    cid = sorted(live[0])[0]
    shown = await cli("customer", cid)
    assert shown.exit_code == 0, shown.output
    body = json.loads(shown.output)
    assert (body["customer_id"], body["frequency"], body["segment"]) == (
        cid, live[0][cid].state.frequency, live[0][cid].segment)
    seg = await cli("segments")
    assert seg.exit_code == 0 and "Champions" in seg.output
    out = tmp_path / "customers.parquet"
    exported = await cli("export", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    assert pq.read_table(out).num_rows == len(live[0])
    before = live[2][live[0][cid].segment]
    gone = await cli("forget", cid)
    assert gone.exit_code == 0 and "erased" in gone.output
    after, _, counts = await stored_state(s, new)
    after_store = store_for(s.model_copy(update={"namespace": new}))
    assert cid not in after and counts.get(live[0][cid].segment, 0) == before - 1
    assert (await cli("customer", cid)).exit_code == 1
    # values written by hand (junk, empty, another Redis type): a clean error, no traceback
    junk, empty, hashed = sorted(live[0])[1:4]
    await after_store.client.set(after_store.keys(0).customer(junk), b"\x9e\x03 junk")
    await after_store.client.set(after_store.keys(0).customer(empty), b"")
    await after_store.client.delete(after_store.keys(0).customer(hashed))
    await after_store.client.hset(after_store.keys(0).customer(hashed), "f", "1")
    for other in (junk, empty, hashed):
        broken = await cli("customer", other)
        assert broken.exit_code == 1 and isinstance(broken.exception, SystemExit)
        assert json.loads(broken.output)["error"] == "unreadable stored value", other
    # the export writes every other customer, names the unreadable ones, and fails
    partial = await cli("export", "--out", str(tmp_path / "partial.csv"))
    assert partial.exit_code == 1 and isinstance(partial.exception, SystemExit)
    assert "3 stored customer value(s) could not be decoded" in partial.stderr
    assert all(repr(c) in partial.stderr for c in (junk, empty, hashed))
    assert "Traceback" not in partial.output
    with open(tmp_path / "partial.csv", newline="") as f:
        written = {row["customer_id"] for row in csv.DictReader(f)}
    assert written == set(live[0]) - {cid, junk, empty, hashed}
    # the tombstone waits in the outbox until the partition's owner publishes it
    entries = [(e.kind, e.value) for e in await after_store.outbox_read(0)]
    assert entries == [("t", cid)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_of(s.kafka_url), acks="all")
    await producer.start()
    try:
        publisher = OutboxPublisher(after_store, BatchSender(producer).send, "unused",
                                    s.customer_segments_topic, "unused")
        await publisher.assign([0])  # as the partition's owner
        published = await publisher.drain([0])
    finally:
        await producer.stop()
        await after_store.client.aclose()
    assert published == 1
    tombstones = [v for _, _, k, v in await await_read(s.customer_segments_topic)
                  if k == cid.encode()]
    assert tombstones and tombstones[-1] is None
    # a customer key of another Redis type is erased too (forget.lua's GET failed: WRONGTYPE)
    erased = await cli("forget", hashed)
    assert erased.exit_code == 0 and "erased" in erased.output, erased.output
    check = store_for(s.model_copy(update={"namespace": new}))
    try:
        assert not await check.client.exists(check.keys(0).customer(hashed))
        # the namespace the switch moved away from still holds the erased customer (a
        # breaker's finding) until it is dropped; the workers' namespace and an alias's
        # target are refused
        assert cid in (await stored_state(s, s.namespace))[0]
        for refused, why in ((new, "resolves to"), (s.namespace + "-spare", "alias"),
                             (new[0] + "\\" + new[1:], "invalid namespace")):  # a glob escape
            await check.client.set(alias_key(s.namespace + "-other"), s.namespace + "-spare")
            out = await cli("drop-namespace", refused)
            assert out.exit_code == 1 and why in out.output, out.output
        kept = {k async for k in check.client.scan_iter(match=f"rfm:{new}:*")}
        # a namespace named "alias" shares the aliases' prefix; its values are binary
        await check.client.set("rfm:alias:{p0}:c:x", b"\x9e\x04\xff")
        dropped = await cli("drop-namespace", s.namespace)
        await check.client.delete("rfm:alias:{p0}:c:x")
        assert dropped.exit_code == 0 and "keys deleted" in dropped.output, dropped.output
        assert [k async for k in check.client.scan_iter(match=f"rfm:{s.namespace}:*")] == []
        assert [k async for k in check.client.scan_iter(match=f"*:c:{cid}")] == []  # anywhere
        assert {k async for k in check.client.scan_iter(match=f"rfm:{new}:*")} == kept
        assert resolve_namespace(s).namespace == new  # the alias is kept
        again = await cli("drop-namespace", s.namespace)
        assert again.exit_code == 0 and "nothing stored" in again.output
    finally:
        await check.client.aclose()


async def test_replay_refuses_a_topic_whose_partition_count_is_not_rfm_partitions(settings):
    """A breaker found the worker applying records of partitions it does not score; the
    replay must refuse the same way before reading anything."""
    s = settings.model_copy(update={"partitions": 2})
    await ensure_topics(s)  # the purchases topic gets 2 partitions
    one = s.model_copy(update={"partitions": 1})
    with pytest.raises(ValueError, match="has 2 partitions but RFM_PARTITIONS is 1"):
        await replay(one, s.namespace + "-r")
    untouched = store_for(one.model_copy(update={"namespace": s.namespace + "-r"}))
    assert await untouched.partition_meta([0]) == {0: (-1, None)}  # nothing applied
    await untouched.client.aclose()


async def test_a_file_out_of_event_time_order_loads_as_the_history_happened(settings, tmp_path):
    """CDNOW is sorted by customer. Loaded in file order, each customer's whole history
    arrived at once behind a watermark years ahead, and a replay of it gave 50,006 segment
    changes where the same events in event-time order give 118,048. ``load`` sorts by event
    time: its topic must replay into the changes the event-time-ordered records give."""
    s = settings.model_copy(update={"partitions": 1})
    path = tmp_path / "cdnow_head.txt"
    with cdnow.open_default() as f:
        path.write_text("\n".join(gzip.decompress(f.read()).decode().splitlines()[:3_001]))
    rows = list(cdnow.read_rows(path))
    assert [r.customer_id for r in rows] == sorted(r.customer_id for r in rows)  # file order
    await ensure_topics(s)
    summary = await load(s, load_file(path, LoadOptions("cdnow")))
    assert summary.events == 3_000
    records = await read_all(bootstrap_of(s.kafka_url), s.purchases_topic, idle_s=1.0)
    stamps = [json.loads(v)["occurred_at"] for *_, v in records]
    assert stamps == sorted(stamps) and len(stamps) == 3_000

    oracle = s.model_copy(update={"purchases_topic": s.namespace + "-by-day"})
    await create_topics(bootstrap_of(s.kafka_url), {oracle.purchases_topic: 1})
    await produce(bootstrap_of(s.kafka_url), oracle.purchases_topic,
                  cdnow_messages(sorted(rows, key=lambda r: r.day)))

    async def changes(settings, name):
        await replay(settings, name, changes_topic=name + "-changes")
        return [{k: v for k, v in json.loads(v).items() if k != "emitted_at"}
                for *_, v in await read_all(bootstrap_of(s.kafka_url), name + "-changes",
                                            idle_s=1.0)]

    loaded = await changes(s, s.namespace + "-loaded")
    expected = await changes(oracle, s.namespace + "-expected")
    assert len(expected) > 1_000
    assert loaded == expected

    # published nowhere: the changes are counted, not written to the outbox; same state
    quiet = await replay(s, s.namespace + "-quiet")
    assert quiet.changes == len(loaded)

    assert (await stored_state(s, s.namespace + "-quiet")
            == await stored_state(s, s.namespace + "-loaded"))


async def test_load_orders_millisecond_times_as_the_worker_reads_them(settings, tmp_path):
    """A breaker found rows 1 ms apart produced in the wrong order: the sort key was a float
    timestamp truncated to ms, 1 ms below the worker's exact event time for some times. The
    record timestamps must be the worker's own event times, in order, equal times stable."""
    s = settings.model_copy(update={"partitions": 1})
    await ensure_topics(s)
    times = ["2004-04-09T23:16:57.363Z", "2004-04-09T23:16:57.362Z", "1970-01-01T00:00:32.053Z",
             "1970-01-01T00:00:32.052Z", "2004-04-09T23:16:57.362+00:00"]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps({
        "event_id": f"e{i}", "customer_id": f"c{i}", "order_id": f"o{i}", "type": "purchase",
        "amount": "1.00", "currency": "USD", "occurred_at": t}) for i, t in enumerate(times)))
    assert (await load(s, load_file(path, LoadOptions("event")))).events == 5
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_of(s.kafka_url), group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(s.purchases_topic, 0)])
        records = []
        while len(records) < 5:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records += batch
    finally:
        await consumer.stop()
    # hand-worked epoch ms: 2004-04-09T23:16:57Z = 1081552617 s; 1970-01-01T00:00:32Z = 32 s
    assert [(json.loads(r.value)["event_id"], r.timestamp) for r in records] == [
        ("e3", 32_052), ("e2", 32_053), ("e1", 1_081_552_617_362), ("e4", 1_081_552_617_362),
        ("e0", 1_081_552_617_363)]



async def test_load_reports_the_rows_it_read_before_it_produces(settings, tmp_path):
    """A fresh user saw no progress during the ~28 s ``load`` spends reading and checking a
    large file before producing anything: the rows read (good and rejected) are reported in
    steps of 1,000 and the rest at the end, then the events produced."""
    s = settings.model_copy(update={"partitions": 1})
    await ensure_topics(s)
    path = tmp_path / "events.jsonl"
    rows = [json.dumps({"event_id": f"e{i}", "customer_id": f"c{i % 7}", "order_id": f"o{i}",
                        "amount": "2.50", "occurred_at": "2024-05-01T10:00:00Z"})
            for i in range(2_345)]
    rows[17] = "{not json"
    path.write_text("\n".join(rows))
    read: list[int] = []
    produced: list[int] = []
    summary = await load(s, load_file(path, LoadOptions("event")), progress=produced.append,
                         read_progress=read.append)
    assert read == [1000, 1000, 345]
    assert (summary.rows, summary.events, sum(produced)) == (2_345, 2_344, 2_344)
    # dry run: rows are still read and reported, nothing produced
    read.clear()
    await load(s, load_file(path, LoadOptions("event")), dry_run=True, read_progress=read.append)
    assert sum(read) == 2_345


@pytest.mark.parametrize("alias", ["hash", "a:b", b"\xff\xfe"])
async def test_a_namespace_alias_written_by_hand_is_a_clean_error(settings, alias):
    """A breaker's case: an alias key (``replay --switch`` writes it) of another Redis type,
    or naming no valid namespace, made every command fail with "Redis unreachable ...
    WRONGTYPE" or a raw ValueError traceback."""
    store = store_for(settings)
    key = f"rfm:alias:{settings.namespace}"
    if alias == "hash":
        await store.client.hset(key, "x", "1")
    else:
        await store.client.set(key, alias)
    env = {"RFM_KAFKA_URL": settings.kafka_url, "RFM_REDIS_URL":
           settings.redis_url.get_secret_value(), "RFM_NAMESPACE": settings.namespace}
    try:
        shown = await asyncio.to_thread(CliRunner().invoke, main, ["segments"], env=env)
    finally:
        await store.client.delete(key)
        await store.client.aclose()
    assert shown.exit_code == 1 and isinstance(shown.exception, SystemExit), shown.output
    assert key in shown.output and "unreachable" not in shown.output
    assert "Traceback" not in shown.output
