"""Delivery guarantees under crashes, against real processes (README, "Guarantees").

Nothing lost, nothing counted twice: SIGKILLed workers, a worker lost from a two-worker group,
a SIGKILLed Redis with AOF everysec, a paused broker. The state oracle is a pandas group-by over
the CDNOW file; the change oracle is an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from oracles import cdnow_state
from stream import cdnow, localstack
from stream.demo import cdnow_messages, ensure_topics, local_settings
from stream.kafka_io import bootstrap_of, produce, read_all
from stream.relay import Relay
from stream.runner import WorkerProcess, start_worker, store_for, wait_applied
from stream.settings import Settings

pytestmark = pytest.mark.timeout(900)

ROWS = sorted(cdnow.read_rows(), key=lambda r: r.day)


def crash_settings(stack: localstack.LocalStack, name: str, **kw) -> Settings:
    """Settings of a crash test: fixed thresholds by default (these tests are about delivery;
    the SIGKILL test runs the default quintile scoring, re-scores and clusters included)."""
    values = dict(namespace=name, app_id=f"rfm-{name}", purchases_topic=f"{name}-purchases",
                  dead_letter_topic=f"{name}-dlq", segment_changes_topic=f"{name}-changes",
                  customer_segments_topic=f"{name}-segments", batch_max=250,
                  scoring_mode="fixed")
    values.update(kw)
    return local_settings(stack, **values)


async def load(settings: Settings, rows=ROWS) -> dict[int, int]:
    await ensure_topics(settings)
    return await produce(bootstrap_of(settings.kafka_url), settings.purchases_topic,
                         cdnow_messages(rows))


async def final_state(settings: Settings) -> dict[str, tuple[int, int, int]]:
    store = store_for(settings)
    out = {}
    try:
        for p in range(settings.partitions):
            async for page in store.iter_customers(p):
                for c in page:
                    s = c.state
                    out[c.customer_id] = (s.frequency, s.monetary_minor, s.last_purchase_ms)
    finally:
        await store.client.aclose()
    return out


async def wait_outbox_empty(settings: Settings, timeout_s: float = 60) -> None:
    store = store_for(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while await store.outbox_depth(range(settings.partitions)):
            assert time.monotonic() < deadline, "outbox not drained"
            await asyncio.sleep(0.2)
    finally:
        await store.client.aclose()


async def changes_without_emitted_at(settings: Settings) -> list[dict]:
    """Segment changes read back from the topic, de-duplicated by change_id, in topic order."""
    seen, out = set(), []
    for *_, value in await read_all(bootstrap_of(settings.kafka_url),
                                    settings.segment_changes_topic, idle_s=1.0):
        change = json.loads(value)
        if change["change_id"] in seen:
            continue
        seen.add(change["change_id"])
        change.pop("emitted_at")
        out.append(change)
    return out


def chain_breaks(changes: list[dict]) -> list[dict]:
    """The changes whose ``previous`` is not the ``current`` of the customer's change before
    (None for the first): one lost, or published out of order, breaks its customer's chain."""
    last: dict[str, dict | None] = {}
    breaks = []
    for c in changes:
        if c["previous"] != last.get(c["customer_id"]):
            breaks.append(c)
        last[c["customer_id"]] = c["current"]
    return breaks


async def stored_segments(store, partitions: int) -> dict[str, str | None]:
    """Each stored customer's published segment."""
    stored = {}
    for p in range(partitions):
        async for page in store.iter_customers(p):
            stored.update({c.customer_id: c.segment for c in page})
    return stored


async def latest_segments(settings: Settings) -> dict[str, str]:
    """Each customer's segment in its latest change on the changes topic."""
    return {c["customer_id"]: c["current"]["segment"]
            for c in await changes_without_emitted_at(settings)}


async def applied_total(settings: Settings) -> int:
    store = store_for(settings)
    try:
        return sum(o + 1 for o, _ in (await store.partition_meta(range(settings.partitions))).values())
    finally:
        await store.client.aclose()


async def applied_at_least(settings: Settings, n: float, workers: list[WorkerProcess],
                           timeout_s: float = 60) -> None:
    """Wait until more than ``n - 1`` records of the load are applied (progress made)."""
    deadline = time.monotonic() + timeout_s
    while await applied_total(settings) < n:
        assert time.monotonic() < deadline, "\n".join(w.log_tail() for w in workers)
        await asyncio.sleep(0.02)


async def test_sigkilled_worker_loses_and_doubles_nothing(stack, unique, tmp_path):
    """Five SIGKILLs at random moments of a one-partition CDNOW load: the final state equals
    the pandas oracle and the de-duplicated segment changes (cluster ids and model versions
    included: the trainer's snapshots are committed with partition 0's steps) equal an
    uninterrupted run's."""
    # a short session: each restarted worker's join waits for it (docs/local-broker.md)
    common = dict(partitions=1, scoring_mode="quintiles", session_timeout_s=2.0,
                  heartbeat_interval_s=0.5)
    calm = crash_settings(stack, unique + "calm", **common)
    crash = crash_settings(stack, unique + "crash", **common)
    calm_targets, crash_targets = await load(calm), await load(crash)

    # the uninterrupted run beside the crashed one (the second core), not before it
    rng = random.Random(20261201)
    workers: list[WorkerProcess] = [start_worker(calm, tmp_path / "calm.log")]
    calm_store, store = store_for(calm), store_for(crash)
    try:
        for i in range(5):
            workers.append(start_worker(crash, tmp_path / f"crash{i}.log"))
            before = await applied_total(crash)
            await applied_at_least(crash, before + 1, workers[-1:])  # this one made progress
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            workers[-1].kill()
        assert await applied_total(crash) < len(ROWS), "the kills came too late to matter"
        workers.append(start_worker(crash, tmp_path / "crash-final.log"))
        await wait_applied(store, crash_targets, workers[-1:], timeout_s=300)
        await wait_applied(calm_store, calm_targets, workers[:1], timeout_s=300)
        await wait_outbox_empty(crash)
        await wait_outbox_empty(calm)
    finally:
        for w in workers:
            w.stop()
        await store.client.aclose()
        await calm_store.client.aclose()

    oracle = cdnow_state()
    assert await final_state(crash) == oracle
    assert await final_state(calm) == oracle
    calm_changes = await changes_without_emitted_at(calm)
    crash_changes = await changes_without_emitted_at(crash)
    assert len(calm_changes) > 20_000
    assert sum(c["current"]["cluster"] is not None for c in calm_changes) > 10_000
    assert crash_changes == calm_changes


async def test_two_workers_one_killed_the_other_takes_over(stack, unique, tmp_path):
    s = crash_settings(stack, unique, partitions=4, batch_max=100)
    targets = await load(s)
    a = start_worker(s, tmp_path / "a.log")
    b = start_worker(s.model_copy(update={"web_port": localstack.free_port()}),
                     tmp_path / "b.log")
    store = store_for(s)
    try:
        await applied_at_least(s, len(ROWS) // 5, [a, b])
        b.kill()
        assert await applied_total(s) < len(ROWS) * 0.9, "b was killed too late to matter"
        await wait_applied(store, targets, [a], timeout_s=300)
        await wait_outbox_empty(s)
    finally:
        a.stop()
        b.stop()
        await store.client.aclose()
    assert await final_state(s) == cdnow_state()


async def test_redis_killed_and_restarted_with_aof(stack, unique, tmp_path):
    """Redis SIGKILLed mid-load (AOF everysec loses up to ~1 s of writes) and restarted on the
    same port: the worker waits (not ready), then re-reads what Redis lost from the topic."""
    redis = localstack.start_redis(tmp_path, appendonly=True)
    own = localstack.LocalStack(stack.broker, redis, tmp_path)
    s = crash_settings(own, unique, partitions=2, batch_max=200)
    targets = await load(s)
    worker = start_worker(s, tmp_path / "worker.log")
    try:
        await applied_at_least(s, len(ROWS) // 3, [worker])
        redis.proc.kill()
        redis.proc.wait(10)
        await asyncio.sleep(1.5)
        ready = _get(f"http://127.0.0.1:{s.web_port}/ready")
        assert ready[0] == 503, ready
        redis = localstack.start_redis(tmp_path, port=redis.port, appendonly=True)
        store = store_for(s)
        try:
            await wait_applied(store, targets, [worker], timeout_s=300)
            await wait_outbox_empty(s)
        finally:
            await store.client.aclose()
        assert _get(f"http://127.0.0.1:{s.web_port}/ready")[0] == 200
    finally:
        worker.stop()
        state = await final_state(s) if redis.proc.poll() is None else {}
        redis.stop()
    assert state == cdnow_state()


async def test_paused_broker_keeps_changes_in_the_outbox(unique, tmp_path):
    """The broker SIGSTOPped mid-load for a few seconds: nothing is lost, every customer's
    latest published change names its stored segment."""
    with localstack.running(tmp_path / "stack") as own:
        s = crash_settings(own, unique, partitions=1)
        rows = [r for r in ROWS if r.customer_id < "05000"]
        targets = await load(s, rows)
        worker = start_worker(s, tmp_path / "worker.log")
        store = store_for(s)
        try:
            await applied_at_least(s, len(rows) // 3, [worker])
            own.broker.pause()
            await asyncio.sleep(4)
            own.broker.resume()
            await wait_applied(store, targets, [worker], timeout_s=300)
            await wait_outbox_empty(s)
            stored = await stored_segments(store, s.partitions)
        finally:
            worker.stop()
            await store.client.aclose()
        assert await latest_segments(s) == stored
        assert chain_breaks(await changes_without_emitted_at(s)) == []
        want = {cid: v for cid, v in cdnow_state().items() if cid < "05000"}
        assert await final_state(s) == want


async def test_redis_losing_writes_mid_run_is_repaired_from_the_topic(stack, unique, tmp_path):
    """Redis loses everything while the worker runs (FLUSHALL: the extreme of an AOF that
    lost its last second): the next records start beyond Redis's applied offset, the worker
    re-reads the missing range from the topic, and the state ends equal to the oracle."""
    redis = localstack.start_redis(tmp_path)
    own = localstack.LocalStack(stack.broker, redis, tmp_path)
    s = crash_settings(own, unique, partitions=1, batch_max=200)
    half = len(ROWS) // 2
    await load(s, ROWS[:half])
    worker = start_worker(s, tmp_path / "worker.log")
    store = store_for(s)
    try:
        await wait_applied(store, {0: half - 1}, [worker], timeout_s=300)
        await store.client.flushall()
        targets = await produce(bootstrap_of(s.kafka_url), s.purchases_topic,
                                cdnow_messages(ROWS[half:]))
        await wait_applied(store, targets, [worker], timeout_s=300)
        assert "re-reading the missing records" in worker.log_path.read_text()
        state = await final_state(s)
    finally:
        worker.stop()
        await store.client.aclose()
        redis.stop()
    assert state == cdnow_state()


async def test_dropped_redis_connections_lose_nothing(stack, unique, tmp_path):
    """The worker's Redis connections killed (CLIENT KILL) three times mid-load: the batch in
    flight is retried, nothing is committed to Kafka that Redis does not hold."""
    redis = localstack.start_redis(tmp_path)
    own = localstack.LocalStack(stack.broker, redis, tmp_path)
    s = crash_settings(own, unique, partitions=4, batch_max=200)
    rows = [r for r in ROWS if r.customer_id < "08000"]
    targets = await load(s, rows)
    worker = start_worker(s, tmp_path / "worker.log")
    store = store_for(s)
    try:
        for fraction in (0.2, 0.4, 0.6):
            await applied_at_least(s, len(rows) * fraction, [worker])
            me = await store.client.client_id()
            for c in await store.client.client_list():
                if int(c["id"]) != me:
                    await store.client.client_kill_filter(_id=c["id"])
        await wait_applied(store, targets, [worker], timeout_s=300)
        await wait_outbox_empty(s)
        assert worker.alive()
        state = await final_state(s)
    finally:
        worker.stop()
        await store.client.aclose()
        redis.stop()
    assert state == {cid: v for cid, v in cdnow_state().items() if cid < "08000"}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_a_killed_outbox_relay_is_started_again_and_nothing_is_lost(stack, unique,
                                                                          tmp_path):
    """The worker's outbox relay (stream.relay, a process of its own) SIGKILLed mid-load: the
    worker starts another, which publishes what the dead one left in the outboxes; every
    customer's latest published change names its stored segment."""
    s = crash_settings(stack, unique, partitions=2)
    rows = [r for r in ROWS if r.customer_id < "03000"]
    targets = await load(s, rows)
    worker = start_worker(s, tmp_path / "worker.log")
    store = store_for(s)

    def relays() -> list[int]:
        return [int(pid) for pid in re.findall(r"outbox relay started \(pid (\d+)\)",
                                               worker.log_path.read_text())]
    try:
        await applied_at_least(s, len(rows) // 3, [worker])
        (first,) = relays()
        os.kill(first, signal.SIGKILL)
        await wait_applied(store, targets, [worker], timeout_s=300)
        await wait_outbox_empty(s)
        assert len(relays()) == 2 and relays()[0] == first, worker.log_tail()
        deadline = time.monotonic() + 10  # ready again: the new relay reported publishing
        while _get(f"http://127.0.0.1:{s.web_port}/ready")[0] != 200:
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.2)
        assert "rfm_relay_restarts_total 1.0" in _get(
            f"http://127.0.0.1:{s.web_port}/metrics")[1].splitlines()
        stored = await stored_segments(store, s.partitions)
    finally:
        worker.stop()
        await store.client.aclose()
    assert await latest_segments(s) == stored
    assert chain_breaks(await changes_without_emitted_at(s)) == []
    assert len(stored) == len({r.customer_id for r in rows})
    with pytest.raises(ProcessLookupError):  # stopped (and reaped) with its worker
        os.kill(relays()[1], 0)


async def test_revoking_through_the_relay_waits_for_its_publication_in_flight(unique,
                                                                               tmp_path):
    """A revocation returns only once what the relay was sending is acknowledged (faust's
    rebalance waits for it), and the relay publishes nothing of the partition after it: the
    broker SIGSTOPped while the relay sends an entry."""
    with localstack.running(tmp_path / "stack") as own:
        s = crash_settings(own, unique, partitions=1)
        await ensure_topics(s)
        store = store_for(s)
        relay = Relay(s, lambda error: None)

        async def depth() -> int:
            return await store.outbox_depth([0])

        async def drained(timeout_s: float = 30) -> None:
            deadline = time.monotonic() + timeout_s
            while await depth():
                assert time.monotonic() < deadline, "outbox not drained"
                await asyncio.sleep(0.05)
        try:
            await relay.assign([0])
            seq = await store.commit(0, -1, {}, [], [("c", '{"n": 1}', "kim")])
            await relay.drain([0])
            await drained()  # the relay is up and connected
            seq = await store.commit(0, seq, {}, [], [("c", '{"n": 2}', "kim")])
            own.broker.pause()
            try:
                await relay.drain([0])
                await asyncio.sleep(1.0)  # read from Redis, sent, not acknowledged
                revoke = asyncio.ensure_future(relay.revoke([0]))
                await asyncio.sleep(2.0)
                assert not revoke.done() and await depth() == 1
            finally:
                own.broker.resume()
            await asyncio.wait_for(revoke, 60)
            assert await depth() == 0  # acknowledged, then deleted, before the revocation
            await store.commit(0, seq, {}, [], [("c", '{"n": 3}', "kim")])
            await relay.drain([0])
            await asyncio.sleep(1.5)  # more than the relay's own round of what it owns
            assert await depth() == 1 and relay.owned == set()
        finally:
            await relay.stop()
            await store.client.aclose()
        values = [v for *_, v in await read_all(bootstrap_of(s.kafka_url),
                                                s.segment_changes_topic, idle_s=0.5)]
    assert values == [b'{"n": 1}', b'{"n": 2}']


async def test_a_relay_that_does_not_answer_a_revocation_is_killed_and_replaced(
        stack, unique, monkeypatch):
    """A relay SIGSTOPped (or hung) would hold a revocation, and so the group's rebalance,
    forever: after ``REVOKE_TIMEOUT_S`` it is killed by its PID and another one publishes the
    partitions still owned, and not the revoked one."""
    import stream.relay

    monkeypatch.setattr(stream.relay, "REVOKE_TIMEOUT_S", 2.0)
    s = crash_settings(stack, unique, partitions=2)
    await ensure_topics(s)
    store = store_for(s)
    relay = Relay(s, lambda error: None)
    try:
        await relay.assign([0, 1])
        stopped = relay.pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        await asyncio.wait_for(relay.revoke([1]), 30)
        assert relay.owned == {0}
        with pytest.raises(ProcessLookupError):  # killed (and reaped)
            os.kill(stopped, 0)
        await store.commit(0, -1, {}, [], [("c", '{"n": 1}', "kim")])
        await store.commit(1, -1, {}, [], [("c", '{"n": 2}', "lee")])
        await relay.drain([0, 1])
        deadline = time.monotonic() + 30
        while await store.outbox_depth([0]):
            assert time.monotonic() < deadline, "partition 0 not published by the new relay"
            await asyncio.sleep(0.05)
        assert relay.pid not in (None, stopped) and await store.outbox_depth([1]) == 1
    finally:
        await relay.stop()
        await store.client.aclose()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_to_the_process_group_stops_the_relay_with_its_worker_cleanly(
        stack, unique, tmp_path, sig):
    """Ctrl-C in a terminal sends SIGINT to the worker's whole process group, the relay
    included (a fresh user: the relay died of it with a traceback, and the worker started
    another one while shutting down); systemd's default ``KillMode=control-group`` and
    ``kill -- -PGID`` do the same with SIGTERM (a breaker). The relay ignores both; the worker
    stops it."""
    s = crash_settings(stack, unique, partitions=1)
    targets = await load(s, [r for r in ROWS if r.customer_id < "00300"])
    worker = start_worker(s, tmp_path / "worker.log")
    store = store_for(s)
    try:
        await wait_applied(store, targets, [worker], timeout_s=120)
        os.killpg(worker.pid, sig)  # its own session and group (localstack.spawn)
        worker.proc.wait(30)
    finally:
        worker.stop()
        await store.client.aclose()
    log = worker.log_path.read_text()
    (relay,) = [int(pid) for pid in re.findall(r"outbox relay started \(pid (\d+)\)", log)]
    assert f"outbox relay {relay} stopped" in log and "Traceback" not in log, log[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(relay, 0)


async def test_a_relay_that_dies_as_its_worker_stops_is_not_started_again(stack, unique):
    """A relay that dies is started again 1 s later, unless its worker stopped meanwhile (a
    fresh user's test run left such a late relay running until pytest ended)."""
    relay = Relay(crash_settings(stack, unique, partitions=1), lambda error: None)
    await relay.assign([0])
    first = relay.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await asyncio.sleep(0.3)  # its reader has seen it die and waits to start another
    await relay.stop()
    await asyncio.sleep(1.5)
    assert relay.pid == first
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)


async def test_a_relay_that_stops_reading_never_blocks_its_worker(stack, unique, monkeypatch):
    """A breaker SIGSTOPped the relay under many small batches: the pipe to it filled, the
    worker's next nudge waited for it to read, so the worker stopped applying, and a
    revocation (a rebalance, a stop) waited forever before its timeout even started. Nudges
    now never wait (skipped while the pipe is full), and a revocation's timeout covers it."""
    import stream.relay

    monkeypatch.setattr(stream.relay, "REVOKE_TIMEOUT_S", 2.0)
    relay = Relay(crash_settings(stack, unique, partitions=2), lambda error: None)
    try:
        await relay.assign([0, 1])
        stopped = relay.pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        for _ in range(20_000):  # ~800 KB of nudges: far more than the pipe holds
            await asyncio.wait_for(relay.drain([0, 1]), 5)
        await asyncio.wait_for(relay.revoke([1]), 30)
        with pytest.raises(ProcessLookupError):  # killed (and reaped)
            os.kill(stopped, 0)
        await relay.drain([0])  # a new relay, for what is still owned
        assert relay.pid not in (None, stopped) and relay.owned == {0}
    finally:
        await relay.stop()


async def test_a_silent_relay_is_killed_and_replaced(stack, unique, monkeypatch):
    """A relay SIGSTOPped (or hung) with no rebalance to time out would hold its partitions'
    changes forever (a breaker): one silent for ``KILL_SILENT_S`` is killed by its PID, and
    another one publishes what waited."""
    import stream.relay

    monkeypatch.setattr(stream.relay, "KILL_SILENT_S", 3.0)
    s = crash_settings(stack, unique, partitions=1)
    await ensure_topics(s)
    store = store_for(s)
    restarts: list[None] = []
    relay = Relay(s, lambda error: None, lambda: restarts.append(None))
    try:
        await relay.assign([0])
        stopped = relay.pid
        assert stopped is not None
        await asyncio.sleep(4.0)  # beating: not killed
        assert relay.pid == stopped and not restarts
        os.kill(stopped, signal.SIGSTOP)
        await store.commit(0, -1, {}, [], [("c", '{"n": 1}', "kim")])
        await relay.drain([0])
        deadline = time.monotonic() + 30
        while await store.outbox_depth([0]):
            assert time.monotonic() < deadline, "not published by a new relay"
            await asyncio.sleep(0.05)
        with pytest.raises(ProcessLookupError):  # killed (and reaped)
            os.kill(stopped, 0)
        assert relay.pid not in (None, stopped) and len(restarts) == 1
    finally:
        await relay.stop()
        await store.client.aclose()
    values = [v for *_, v in await read_all(bootstrap_of(s.kafka_url),
                                            s.segment_changes_topic, idle_s=0.5)]
    assert values == [b'{"n": 1}']


async def test_a_relay_beating_while_its_worker_was_stopped_is_not_killed(stack, unique,
                                                                         monkeypatch):
    """A worker stopped (SIGSTOP, ``docker pause``) or blocked longer than ``KILL_SILENT_S``
    has not read its relay's beats: the relay is not silent (a breaker's healthy relay was
    killed after its worker's 40 s pause)."""
    import stream.relay

    monkeypatch.setattr(stream.relay, "KILL_SILENT_S", 2.0)
    restarts: list[None] = []
    relay = Relay(crash_settings(stack, unique, partitions=1), lambda error: None,
                  lambda: restarts.append(None))
    try:
        await relay.assign([0])
        running = relay.pid
        await asyncio.sleep(1.5)
        time.sleep(6.0)  # the worker's event loop blocked: beats wait in the pipe
        await asyncio.sleep(2.5)  # the watchdog's next ticks
        assert relay.pid == running and not restarts and relay.silent_s() < 2.0
    finally:
        await relay.stop()


async def test_a_relay_starts_from_a_folder_holding_a_stream_module(stack, unique, tmp_path,
                                                                   monkeypatch):
    """``python -m stream.relay`` looked in the working directory first: a worker started in
    a folder with a ``stream.py`` (or another checkout) ran no relay, or another version's
    (a breaker). The relay is started with ``-P``."""
    (tmp_path / "stream.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    s = crash_settings(stack, unique, partitions=1)
    await ensure_topics(s)
    store = store_for(s)
    restarts: list[None] = []
    relay = Relay(s, lambda error: None, lambda: restarts.append(None))
    try:
        await relay.assign([0])
        await store.commit(0, -1, {}, [], [("c", '{"n": 1}', "kim")])
        await relay.drain([0])
        deadline = time.monotonic() + 30
        while await store.outbox_depth([0]):
            assert time.monotonic() < deadline and not restarts, "no relay publishes"
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
        await store.client.aclose()


async def test_a_stopped_relay_is_reported_and_dies_with_its_killed_worker(stack, unique,
                                                                          tmp_path):
    """The worker applies events while its relay is SIGSTOPped (the changes wait in the
    outbox), /ready names the silent relay, and a SIGKILL of the worker ends the stopped relay
    too (Linux's SIGTERM on the parent's death would stay pending on a stopped process)."""
    s = crash_settings(stack, unique, partitions=2)
    await load(s, [r for r in ROWS if r.customer_id < "00500"])
    worker = start_worker(s, tmp_path / "worker.log")
    store = store_for(s)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.findall(r"outbox relay started \(pid (\d+)\)",
                                       worker.log_path.read_text())):
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.05)
        relay = int(found[0])
        os.kill(relay, signal.SIGSTOP)
        deadline = time.monotonic() + 120
        while await applied_total(s) == 0:
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 40  # before the worker kills it (KILL_SILENT_S)
        while "outbox relay silent" not in _get(f"http://127.0.0.1:{s.web_port}/ready")[1]:
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.5)
        assert await store.outbox_depth(range(s.partitions)) > 0
        worker.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{relay}").exists():  # SIGKILLed by Linux, reaped by init
            assert time.monotonic() < deadline, "the stopped relay outlived its worker"
            await asyncio.sleep(0.1)
    finally:
        worker.stop()
        await store.client.aclose()


async def _committed(settings: Settings) -> dict[int, int]:
    """The consumer group's committed offsets of the purchases topic (-1: none)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_of(settings.kafka_url),
                                group_id=settings.app_id, enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for p in range(settings.partitions):
            offset = await consumer.committed(TopicPartition(settings.purchases_topic, p))
            out[p] = -1 if offset is None else offset
        return out
    finally:
        await consumer.stop()


async def test_a_caught_up_group_on_an_empty_namespace_applies_the_whole_topic(
        stack, unique, tmp_path):
    """The group's offsets are committed at the end of the topic, and Redis holds nothing for
    the namespace (a new one, or a Redis emptied while the workers were stopped): the worker
    starts from Redis's applied offsets, not the group's, and applies every record without
    any new one arriving (README "Guarantees"). faust seeks to the group's offsets after the
    assignment signal; before the worker sought again after it, this waited forever."""
    s = crash_settings(stack, unique, partitions=4, batch_max=2000)
    targets = await load(s)  # all of CDNOW: with less, faust's seek was done before ours
    worker = start_worker(s, tmp_path / "first.log")
    store = store_for(s)
    try:
        await wait_applied(store, targets, [worker], timeout_s=300)
        deadline = time.monotonic() + 60
        while await _committed(s) != {p: t + 1 for p, t in targets.items()}:
            assert time.monotonic() < deadline, await _committed(s)
            await asyncio.sleep(0.5)
    finally:
        worker.stop()
        await store.client.aclose()
    fresh = s.model_copy(update={"namespace": f"{unique}n"})
    worker = start_worker(fresh, tmp_path / "second.log")
    store = store_for(fresh)
    try:
        await wait_applied(store, targets, [worker], timeout_s=120)
        state = await final_state(fresh)
    finally:
        worker.stop()
        await store.client.aclose()
    assert state == cdnow_state()
