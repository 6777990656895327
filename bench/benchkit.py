"""Helpers shared by the benchmarks (not a benchmark): the machine line, the raw aiokafka
consume ceiling, starting the real worker or the empty faust agent (``empty_agent.py``) as
processes stopped by their PID, reading a worker log for errors, and percentiles.

The scripts in ``bench/`` run as ``python bench/<name>.py``, so this file imports as
``benchkit``.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.runner import WorkerProcess, spawn_with_settings
from stream.runner import start_worker as start_real_worker
from stream.settings import Settings

HERE = Path(__file__).resolve().parent
LOOPS = ("aio", "uvloop")
T = TypeVar("T")


def machine() -> str:
    """One line naming the machine and the Python, printed first by every benchmark."""
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()} (figures are noisy: broker, Redis and the "
            "benchmark share the cores with anything else running)")


def check_loop(loop: str) -> None:
    """Exit with a message when ``loop`` is ``uvloop`` and it is not installed."""
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            sys.exit("--loop uvloop: uvloop is not installed (.venv/bin/pip install uvloop; "
                     "it is not a project dependency)")


def run(coro: Coroutine[Any, Any, T], loop: str = "aio") -> T:
    """``asyncio.run``, or ``uvloop.run`` when ``loop`` is ``uvloop``."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# --- the raw aiokafka ceiling ---------------------------------------------------------------
async def raw_consume_rates(bootstrap: str, topic: str, passes: int = 3) -> list[float]:
    """Events/s of a bare ``AIOKafkaConsumer.getmany`` loop (no group, default settings)
    reading every partition of ``topic`` from the beginning to its high watermark.

    One untimed pass first (connections, metadata, high watermarks), then ``passes`` timed
    ones, each from ``seek_to_beginning`` to the last record. The high watermark comes from
    fetch responses (the local broker's ``end_offsets`` is wrong, docs/local-broker.md).
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        rates = []
        for i in range(passes + 1):
            await consumer.seek_to_beginning(*tps)
            started, n = time.perf_counter(), 0
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                n += sum(len(recs) for recs in batch.values())
                ends = [consumer.highwater(tp) for tp in tps]
                if None not in ends and all([await consumer.position(tp) >= hw
                                             for tp, hw in zip(tps, ends, strict=True)]):
                    break
            if i:
                rates.append(n / (time.perf_counter() - started))
        return rates
    finally:
        await consumer.stop()


# --- worker processes ---------------------------------------------------------------------


def start_worker(settings: Settings, log_path: Path, loop: str = "aio") -> WorkerProcess:
    """The real worker: ``stream.runner.start_worker`` (``rfm-stream worker``), or with
    ``loop="uvloop"`` the same app started with faust's ``-L uvloop`` (the CLI cannot pass a
    faust option that goes before ``worker``)."""
    if loop == "aio":
        return start_real_worker(settings, log_path)
    # faust picks the loop from sys.argv when it is first imported: set it before the import
    code = ("import sys; sys.argv = ['rfm-stream', '-L', sys.argv[1], 'worker', '--loglevel', "
            "'info']; from stream.app import app, settings as s; "
            "sys.argv += ['--web-bind', s.web_bind, '--web-port', str(s.web_port)]; app.main()")
    return spawn_with_settings([sys.executable, "-c", code, loop], settings, log_path)


def start_empty_agent(settings: Settings, log_path: Path, progress_path: Path,
                      loop: str = "aio", mode: str = "agent") -> WorkerProcess:
    """``bench/empty_agent.py``: a faust app built with the worker's settings that does
    nothing with the purchases topic (``mode``: ``agent``, an empty faust agent; ``batch``,
    the worker's batch delivery with an empty handler); it appends its progress to
    ``progress_path``."""
    progress_path.unlink(missing_ok=True)
    return spawn_with_settings(
        [sys.executable, str(HERE / "empty_agent.py"), "-L", loop, "worker", "--loglevel", "warn",
         "--web-bind", settings.web_bind, "--web-port", str(settings.web_port)],
        settings, log_path, {"BENCH_PROGRESS": str(progress_path), "BENCH_MODE": mode})


def read_progress(path: Path) -> tuple[int, int, float, float] | None:
    """The empty agent's last progress line: (events counted, events of its first batch,
    wall time of its first batch, wall time of its last batch); None before the first."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    if not lines:
        return None
    n, first_n, first_t, last_t = lines[-1].split()
    return int(n), int(first_n), float(first_t), float(last_t)


async def empty_agent_rate(settings: Settings, total: int, log_path: Path, progress_path: Path,
                           loop: str = "aio", mode: str = "agent", stall_s: float = 60.0
                           ) -> float:
    """Events/s of the empty agent over ``total`` events of the settings' purchases topic,
    timed like the worker: from its first batch (whose events are not counted) to its last.

    Raises
    ------
    RuntimeError
        When it exits, or counts nothing new for ``stall_s`` seconds (its log tail).
    """
    agent = start_empty_agent(settings, log_path, progress_path, loop, mode)
    try:
        p = await wait_progress(agent, progress_path, total, stall_s)
    finally:
        agent.stop()
    n, first_n, first_t, last_t = p
    return (n - first_n) / (last_t - first_t)


async def wait_progress(agent: WorkerProcess, progress_path: Path, total: int,
                        stall_s: float = 60.0) -> tuple[int, int, float, float]:
    """Wait until the empty agent has counted ``total`` events; its last progress line."""
    last, since = -1, time.monotonic()
    while True:
        p = read_progress(progress_path)
        n = p[0] if p else 0
        if p and n >= total:
            return p
        if n != last:
            last, since = n, time.monotonic()
        if not agent.alive():
            raise RuntimeError("the empty agent exited:\n" + agent.log_tail())
        if time.monotonic() - since > stall_s:
            raise RuntimeError(f"the empty agent counted {n} of {total} events and nothing more "
                               f"for {stall_s:g} s:\n" + agent.log_tail())
        await asyncio.sleep(0.05)


def loop_of(log_path: Path) -> str:
    """The event loop a faust process ran on, from its start-up banner ("+uvloop")."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return "?"
    return "uvloop" if "+uvloop" in text else "aio"


_PROBLEM = re.compile(r"\b(ERROR|CRITICAL|Traceback)\b")


def log_problems(path: Path, show: int = 3) -> str:
    """A line saying how many ERROR/CRITICAL/Traceback lines a log holds, with the first few."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if _PROBLEM.search(ln)]
    except FileNotFoundError:
        return f"{path.name}: missing"
    if not lines:
        return f"{path.name}: no ERROR/CRITICAL/Traceback lines"
    shown = "\n".join("    " + ln[:200] for ln in lines[:show])
    return f"{path.name}: {len(lines)} ERROR/CRITICAL/Traceback lines, first {show}:\n{shown}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentiles(values: Sequence[float], missing: int, qs: Sequence[float]) -> list[float]:
    """Percentiles ``qs`` (0-100) of ``values`` plus ``missing`` values that never arrived
    (counted as infinitely late, so a percentile they reach is ``inf``)."""
    data = sorted(values) + [math.inf] * missing
    if not data:
        return [math.nan for _ in qs]
    return [data[min(len(data) - 1, math.ceil(q / 100 * len(data)) - 1)] if q > 0 else data[0]
            for q in qs]
