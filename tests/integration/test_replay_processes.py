"""``replay --processes N`` against the real broker and Redis: the state of every partition
against a pandas oracle, refusals, a failing or killed replay process, a killed parent, and
``--switch`` twice through the CLI."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from state.keys import replay_frontier_key
from stream import cdnow
from stream.demo import cdnow_messages, ensure_topics
from stream.kafka_io import bootstrap_of, produce
from stream.pipeline import GapError
from stream.replay import replay
from stream.runner import resolve_namespace, store_for

pytestmark = pytest.mark.timeout(600)
ROWS = 4_000


def cdnow_rows() -> list[cdnow.CdnowRow]:
    return sorted(cdnow.read_rows(), key=lambda r: r.day)


async def loaded(settings, n: int = ROWS):
    """The settings with a 4-partition purchases topic holding the first ``n`` CDNOW rows."""
    s = settings.model_copy(update={"partitions": 4})
    await ensure_topics(s)
    rows = cdnow_rows()[:n]
    await produce(bootstrap_of(s.kafka_url), s.purchases_topic, cdnow_messages(rows))
    return s, rows


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie left to a parent that does not reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return out


async def test_a_replay_in_two_processes_rebuilds_every_customer_of_every_partition(settings):
    s, rows = await loaded(settings)
    # the oracle: the documented rules over the rows with pandas (a repeated event id counts once)
    df = pd.DataFrame([{"customer": r.customer_id, "event": r.event_id, "order": r.order_id,
                        "cents": int(r.amount * 100),
                        "ms": int(r.occurred_at.timestamp() * 1000)} for r in rows])
    df = df.drop_duplicates("event")
    expected = {c: (g["order"].nunique(), int(g["cents"].sum()), int(g["ms"].max()))
                for c, g in df.groupby("customer")}

    reported: list[int] = []
    new = s.namespace + "-p2"
    result = await replay(s, new, processes=2, progress=reported.append)
    assert (result.records, result.applied, sum(reported)) == (ROWS, len(df), ROWS)
    store = store_for(s.model_copy(update={"namespace": new}))
    try:
        rebuilt = {}
        for p in range(4):
            async for page in store.iter_customers(p):
                rebuilt.update({c.customer_id: (c.state.frequency, c.state.monetary_minor,
                                                c.state.last_purchase_ms) for c in page})
        offsets = await store.partition_meta(range(4))
    finally:
        await store.client.aclose()
    assert rebuilt == expected
    assert sum(offset + 1 for offset, _ in offsets.values()) == ROWS
    assert multiprocessing.active_children() == []

    with pytest.raises(ValueError, match="already holds state"):  # refused before any process
        await replay(s, new, processes=2)
    two = s.model_copy(update={"partitions": 2})  # a process's refusal is the replay's
    with pytest.raises(ValueError, match="has 4 partitions but RFM_PARTITIONS is 2"):
        await replay(two, s.namespace + "-p2b", processes=2)
    assert multiprocessing.active_children() == []


async def test_a_killed_replay_process_fails_the_replay_and_the_others_are_stopped(settings):
    """A breaker killed one process of a pool, which started another and waited forever."""
    s, _ = await loaded(settings, len(cdnow_rows()))  # all of CDNOW: no process done early
    killed: list[int] = []

    def kill_one(_: int) -> None:
        if not killed:
            victim = multiprocessing.active_children()[0]
            killed.append(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)

    with pytest.raises(RuntimeError, match=r"exited with code -9 before reporting"):
        await replay(s, s.namespace + "-k", processes=2, progress=kill_one)
    assert killed and multiprocessing.active_children() == []


async def test_a_stopped_replay_process_is_killed_when_the_replay_fails(settings):
    """A breaker's case: SIGTERM stays pending on a stopped process, and the parent waited for
    it forever."""
    s, _ = await loaded(settings, len(cdnow_rows()))
    done: list[int] = []

    def stop_one_kill_the_other(_: int) -> None:
        if not done:
            first, second = multiprocessing.active_children()[:2]
            done.extend([first.pid, second.pid])
            os.kill(first.pid, signal.SIGSTOP)
            os.kill(second.pid, signal.SIGKILL)

    with pytest.raises(RuntimeError, match=r"exited with code -9 before reporting"):
        await replay(s, s.namespace + "-s", processes=2, progress=stop_one_kill_the_other)
    assert done and multiprocessing.active_children() == []
    assert not any(alive(pid) for pid in done)


async def test_of_two_replays_started_at_once_into_one_namespace_one_is_refused(settings):
    """A breaker's case: both passed the check for state and each applied half the records."""
    s, _ = await loaded(settings)
    new = s.namespace + "-twice"
    results = await asyncio.gather(replay(s, new, processes=2), replay(s, new),
                                   return_exceptions=True)
    refused = [r for r in results if isinstance(r, ValueError)]
    done = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) == 1 and len(done) == 1, results
    assert "another replay" in str(refused[0]) or "already holds state" in str(refused[0])
    assert done[0].applied == done[0].records == ROWS
    # a refusal before anything was written leaves the namespace free
    two = s.model_copy(update={"partitions": 2})
    with pytest.raises(ValueError, match="has 4 partitions"):
        await replay(two, s.namespace + "-free", processes=2)
    assert (await replay(s, s.namespace + "-free", processes=2)).applied == ROWS


def test_an_error_that_cannot_be_pickled_reaches_the_parent_as_its_type_and_message(
        settings, monkeypatch):
    """GapError takes more than a message: a pool could not send it back and hung."""
    import stream.replay as replay_module

    async def gap(*args, **kwargs):
        raise GapError(1, 3000, 3107)

    monkeypatch.setattr(replay_module, "_replay", gap)
    receive, send = multiprocessing.Pipe(duplex=False)
    replay_module._replay_process(send, os.getppid(), settings, "ns", [1], None, None, 2000)
    kind, name, text = receive.recv()
    assert (kind, name) == ("error", "GapError") and "3107" in text
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    with pytest.raises(RuntimeError, match=r"partitions \[1\] failed: GapError: .*3107"):
        pipe_out, pipe_in = multiprocessing.Pipe(duplex=False)
        pipe_in.send((kind, name, text))
        replay_module._outcome(pipe_out, process, [1])


def ignore_sigint() -> None:
    """What a shell does to a job it starts with ``&`` when job control is off."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
async def test_replay_processes_stop_when_the_parent_is_killed(settings, tmp_path, sigint):
    """A breaker's case: SIGTERM to the parent left both processes replaying to the end.
    Another: it then left its frontier key in Redis and said nothing. SIGTERM now stops a
    replay as Ctrl-C does: the processes stopped, the frontier key removed, the namespace's
    fate told. A third: a replay started in the background by a script (SIGINT ignored)
    finished despite SIGTERM."""
    s, _ = await loaded(settings, len(cdnow_rows()))  # all of CDNOW: longer than the test
    env = {**os.environ, "RFM_KAFKA_URL": s.kafka_url,
           "RFM_REDIS_URL": s.redis_url.get_secret_value(), "RFM_NAMESPACE": s.namespace,
           "RFM_PARTITIONS": "4", "RFM_PURCHASES_TOPIC": s.purchases_topic}
    log = (tmp_path / "replay.log").open("w")
    parent = subprocess.Popen([sys.executable, "-m", "stream", "replay", "--namespace",
                               s.namespace + "-t", "--processes", "2"], env=env,
                              stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=None if sigint == "default" else ignore_sigint)
    spawned: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(spawned) < 2 and time.monotonic() < deadline and parent.poll() is None:
            # the spawned replay processes (multiprocessing also starts a resource tracker)
            spawned = [pid for pid in children(parent.pid)
                       if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            await asyncio.sleep(0.1)
        assert len(spawned) == 2, (tmp_path / "replay.log").read_text()
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 1
        said = (tmp_path / "replay.log").read_text()
        assert ("Error: interrupted (what was applied stays in" in said
                or "Error: interrupted (nothing was written" in said), said
        # the background case raised KeyboardInterrupt inside the event loop: ~110 lines of
        # "Task exception was never retrieved" from aiokafka's tasks followed the message
        assert "Task exception was never retrieved" not in said, said
        assert "Traceback" not in said and "was destroyed but it is pending" not in said, said
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(alive(pid) for pid in spawned)
        store = store_for(s.model_copy(update={"namespace": s.namespace + "-t"}))
        try:  # they stopped, not finished
            applied = sum(o + 1 for o, _ in (await store.partition_meta(range(4))).values())
            assert not await store.client.exists(replay_frontier_key(s.namespace + "-t"))
        finally:
            await store.client.aclose()
        assert applied < len(cdnow_rows())
    finally:
        for pid in [parent.pid, *spawned]:  # whatever is left, by PID
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait(30)
        log.close()


async def test_a_background_replay_in_one_process_stops_cleanly_on_sigterm(settings, tmp_path):
    """A breaker's case: a replay in one process started with SIGINT ignored (a script's
    ``&`` job) raised KeyboardInterrupt inside its event loop on SIGTERM; its error message
    came out, followed by ~60-110 lines of "Task exception was never retrieved" from aiokafka's
    tasks (4 of 5 runs). Now SIGTERM cancels the replay's task, as asyncio does for Ctrl-C."""
    s, _ = await loaded(settings, len(cdnow_rows()))
    env = {**os.environ, "RFM_KAFKA_URL": s.kafka_url,
           "RFM_REDIS_URL": s.redis_url.get_secret_value(), "RFM_NAMESPACE": s.namespace,
           "RFM_PARTITIONS": "4", "RFM_PURCHASES_TOPIC": s.purchases_topic}
    target = s.model_copy(update={"namespace": s.namespace + "-bg"})
    store = store_for(target)
    proc = subprocess.Popen([sys.executable, "-m", "stream", "replay", "--namespace",
                             target.namespace], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=ignore_sigint)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # until it applies
            if any(o >= 0 for o, _ in (await store.partition_meta(range(4))).values()):
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        said = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        await store.client.aclose()
    assert proc.returncode == 1, said
    assert "Error: interrupted (what was applied stays in" in said, said
    assert "Task exception was never retrieved" not in said and "Traceback" not in said, said


async def test_a_second_switch_moves_the_configured_name(settings):
    """A breaker's case: the CLI passed the settings resolved through the first switch, and
    the second pointed the first target at the new namespace instead of the configured name."""
    from click.testing import CliRunner

    from stream.cli import main

    s, _ = await loaded(settings)
    env = {"RFM_KAFKA_URL": s.kafka_url, "RFM_REDIS_URL": s.redis_url.get_secret_value(),
           "RFM_NAMESPACE": s.namespace, "RFM_PARTITIONS": "4",
           "RFM_PURCHASES_TOPIC": s.purchases_topic}
    runner = CliRunner()
    for target in (s.namespace + "-a", s.namespace + "-b"):
        done = await asyncio.to_thread(runner.invoke, main, [
            "replay", "--namespace", target, "--switch", "--processes", "2"], env=env)
        assert done.exit_code == 0, done.output
        assert f"{s.namespace!r} now resolves to {target!r}" in done.output
        assert f"{target!r} keeps its populations as chunked" in done.output
        assert resolve_namespace(s).namespace == target


@pytest.mark.parametrize("processes", [1, 2])
async def test_a_replay_ends_at_the_as_of_of_all_partitions_final_watermarks(settings,
                                                                             processes):
    """A fresh user found a CDNOW replay's partitions ending at as-of 1998-06-24 to 06-28
    where live reaches 06-30: each partition's last step scored at the minimum of the
    watermarks at that moment. The oracle: each partition's latest event time (the rows'
    own times, partitioned as the producer does), and the minimum of those."""
    from stream.services import partition_for

    s, rows = await loaded(settings)
    latest: dict[int, int] = {}
    for r in rows:
        p = partition_for(r.customer_id, 4)
        latest[p] = max(latest.get(p, 0), int(r.occurred_at.timestamp() * 1000))
    new = f"{s.namespace}-asof{processes}"
    await replay(s, new, processes=processes)
    store = store_for(s.model_copy(update={"namespace": new}))
    try:
        as_of = [int(await store.client.hget(store.keys(p).meta, "asof")) for p in range(4)]
    finally:
        await store.client.aclose()
    assert as_of == [min(latest.values())] * 4
