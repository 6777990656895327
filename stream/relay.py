"""The outbox relay: the worker's outbox publisher in a process of its own.

Publishing a batch's outbox (reading it back from Redis, producing each segment change to two
topics and each dead letter to the dead-letter topic, waiting for the broker's
acknowledgements, deleting the entries) took ~14% of the worker's main thread, and that thread
is what bounds the worker (``docs/performance.md``, "Twenty-second pass"). So the worker
starts this process (``python -m stream.relay``), which runs :class:`stream.outbox.OutboxPublisher`
(the same claims, fencing and at-least-once deletion) with a Redis client and a Kafka producer
of its own, on the second core.

The relay runs with the worker's settings (as ``RFM_*`` variables: ``stream.runner.settings_env``,
the namespace resolved). The worker (:class:`Relay`) talks to it over the relay's stdin and
stdout, one JSON object per line; worker -> relay:

- ``{"op": "assign", "partitions": [..]}``: claim these outboxes and publish them;
- ``{"op": "revoke", "partitions": [..], "id": n}``: stop publishing them; the relay answers
  ``{"op": "revoked", "id": n}`` once the publication in flight is acknowledged (faust's
  revocation waits for it, as it did for the publisher in the worker's own process);
- ``{"op": "drain", "partitions": [..]}``: a batch left entries there (drains coalesce; the
  relay also drains everything it owns every second);

relay -> worker: ``{"op": "status", "error": text | null}`` when publishing starts or stops
failing, ``{"op": "fenced", "partition": p}`` when another worker claimed a partition, and
``{"op": "beat"}`` every second from a task of its own (its event loop turns, whatever its
publication waits for). A relay silent for :data:`SILENT_S` is a ``/ready`` problem; one
silent for :data:`KILL_SILENT_S` (SIGSTOPped, hung) is killed by its PID and replaced.

The worker never waits for the relay to read: a relay that stops reading (SIGSTOPped, hung)
must not stop the worker. Messages go into the pipe's buffer without waiting; a drain nudge
is skipped while the buffer holds more than :data:`MAX_BUFFERED` bytes (the relay drains what
it owns every second anyway). The relay exits when its stdin closes (the worker stopped it);
it ignores SIGINT and SIGTERM, which reach the worker's whole process group (Ctrl-C,
``kill -- -PGID``, systemd's default ``KillMode=control-group``): the worker stops it. When the
worker dies Linux sends it SIGKILL (``prctl(PR_SET_PDEATHSIG)``: SIGTERM would stay pending on
a stopped relay). Entries it had not published stay in the outboxes: the next publisher sends
them. A relay that dies while the worker runs is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

from stream.settings import Settings

log = logging.getLogger(__name__)

DRAIN_EVERY_S = 1.0  # the relay drains everything it owns at least this often
BEAT_S = 1.0  # the relay's beats
STOP_TIMEOUT_S = 10.0  # for a relay told to stop, before it is killed
# for a relay's answer to a revocation: longer than a send can take (aiokafka's request
# timeout, 40 s), so only a relay that cannot answer (stopped, hung) is killed and replaced
REVOKE_TIMEOUT_S = 60.0
SILENT_S = 15.0  # a relay that has not beaten for this long is a /ready problem
KILL_SILENT_S = 30.0  # ... and for this long is killed and replaced (its beats come every 1 s)
MAX_BUFFERED = 64 * 1024  # bytes of messages waiting in the pipe before nudges are skipped


class Relay:
    """The worker's handle on its relay process: which partitions it publishes, nudges after
    batches, and revocations that return once the relay's publication in flight is done.

    Parameters
    ----------
    settings
        The worker's settings (namespace resolved).
    on_status
        Called with the relay's publishing error (None: publishing again).
    on_restart
        Called when a relay that died (or was killed) is started again.
    """

    def __init__(self, settings: Settings, on_status: Callable[[str | None], None],
                 on_restart: Callable[[], None] | None = None):
        self.settings, self.on_status, self.on_restart = settings, on_status, on_restart
        self._owned: set[int] = set()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._revokes: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        self._starting = asyncio.Lock()
        self._stopping = False
        self._heard: float | None = None  # loop time of the relay's last message
        self._watch: asyncio.Task[None] | None = None

    def silent_s(self) -> float:
        """Seconds since the running relay last reported (0 before it started)."""
        if self._heard is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._heard

    @property
    def owned(self) -> set[int]:
        """The partitions assigned and not since revoked (nor claimed by another worker)."""
        return set(self._owned)

    @property
    def pid(self) -> int | None:
        """The relay's process id (None before it started)."""
        return None if self._proc is None else self._proc.pid

    async def assign(self, partitions: Iterable[int]) -> None:
        """Publish ``partitions`` (newly assigned) from now on."""
        ps = sorted(set(partitions))
        if not self._stopping:
            await self._running()  # a relay started now is told only what was owned before
        self._owned.update(ps)
        await self._send({"op": "assign", "partitions": ps})

    async def revoke(self, partitions: Iterable[int]) -> None:
        """Stop publishing ``partitions``; returns once the relay's publication in flight (if
        any) is acknowledged or failed, or the relay is gone: a relay that does not answer
        within :data:`REVOKE_TIMEOUT_S` (stopped, hung) is killed by its PID, and another one
        started for the partitions still owned."""
        ps = sorted(set(partitions))
        self._owned.difference_update(ps)
        if not ps or self._proc is None:
            return
        self._next_id += 1
        done = self._revokes[self._next_id] = asyncio.get_running_loop().create_future()
        await self._send({"op": "revoke", "partitions": ps, "id": self._next_id})
        proc = self._proc
        try:
            await asyncio.wait_for(asyncio.shield(done), REVOKE_TIMEOUT_S)
        except TimeoutError:
            log.error("outbox relay %d did not answer a revocation within %.0f s: killed",
                      proc.pid, REVOKE_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await done  # its reader resolves it when the process is gone

    async def drain(self, partitions: Iterable[int]) -> None:
        """Tell the relay that ``partitions`` have new entries (it publishes those it owns);
        skipped while the relay is not reading (it drains everything it owns every second)."""
        await self._send({"op": "drain", "partitions": sorted(set(partitions))}, nudge=True)

    async def stop(self) -> None:
        """Close the relay's input and wait for it to exit (killed by its PID after
        :data:`STOP_TIMEOUT_S`); no relay is started after this."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        async with self._starting:  # one being started now is stopped too
            proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("outbox relay %d did not stop within %.0f s: killed", proc.pid,
                        STOP_TIMEOUT_S)
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader
        log.info("outbox relay %d stopped", proc.pid)

    async def _send(self, message: dict[str, Any], nudge: bool = False) -> None:
        """Put ``message`` in the relay's pipe without waiting for the relay to read it."""
        if self._stopping:
            return
        proc = await self._running()
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return  # stopping, or it died: the reader starts another and assigns what is owned
        if nudge and proc.stdin.transport.get_write_buffer_size() > MAX_BUFFERED:
            return
        proc.stdin.write(json.dumps(message).encode() + b"\n")

    async def _running(self) -> asyncio.subprocess.Process | None:
        """The relay, started if it is not running (None once stopping)."""
        async with self._starting:
            if self._stopping:
                return None
            if self._proc is None or self._proc.returncode is not None:
                await self._spawn()
            return self._proc

    async def _spawn(self) -> None:
        from stream.localstack import die_with_parent
        from stream.runner import settings_env

        env = {k: v for k, v in os.environ.items() if not k.startswith("RFM_")}
        proc = await asyncio.create_subprocess_exec(
            # -P: not a stream/ or stream.py of the working directory (a breaker's worker,
            # started in such a folder, ran no relay: or would have run another version's)
            sys.executable, "-P", "-m", "stream.relay", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env={**env, **settings_env(self.settings)},
            preexec_fn=die_with_parent(signal.SIGKILL))
        assert proc.stdin is not None
        if self._owned:
            proc.stdin.write(json.dumps({"op": "assign", "partitions": sorted(self._owned)})
                             .encode() + b"\n")
        self._proc, self._heard = proc, asyncio.get_running_loop().time()
        self._reader = asyncio.ensure_future(self._read(proc))
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watchdog())
        log.info("outbox relay started (pid %d)", proc.pid)

    async def _watchdog(self) -> None:
        """Kill a relay silent for :data:`KILL_SILENT_S` (its reader starts another)."""
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while not self._stopping:
            await asyncio.sleep(1.0)
            proc = self._proc
            last, tick = tick, loop.time()
            if tick - last > 5.0 and self._heard is not None:
                # the worker itself was stopped (SIGSTOP, docker pause) or blocked: the relay's
                # beats wait unread in the pipe; count its silence from now (a breaker's
                # healthy relay was killed after its worker's 40 s pause)
                self._heard = max(self._heard, tick)
                continue
            if proc is None or proc.returncode is not None or self._stopping:
                continue
            if self.silent_s() > KILL_SILENT_S:
                log.error("outbox relay %d silent for %.0f s (stopped or hung): killed",
                          proc.pid, self.silent_s())
                self._heard = None  # once
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                message = json.loads(line)
                message["op"]
            except (ValueError, TypeError, KeyError):
                log.warning("outbox relay %d: not a message: %r", proc.pid, line[:200])
                continue
            self._heard = asyncio.get_running_loop().time()
            if message["op"] == "revoked":
                done = self._revokes.pop(message["id"], None)
                if done is not None and not done.done():
                    done.set_result(None)
            elif message["op"] == "status":
                self.on_status(message["error"])
            elif message["op"] == "fenced":
                self._owned.discard(message["partition"])
        code = await proc.wait()
        for done in self._revokes.values():  # it publishes nothing more
            if not done.done():
                done.set_result(None)
        self._revokes.clear()
        if not self._stopping:
            log.error("outbox relay %d exited (code %s); starting it again", proc.pid, code)
            self.on_status(f"outbox relay exited (code {code}); restarted")
            if self.on_restart is not None:
                self.on_restart()
            await asyncio.sleep(1.0)  # no busy loop if it cannot start
            try:
                await self._running()  # (not once stopping)
            except Exception:
                log.exception("outbox relay could not be started again; the next batch tries")


async def serve(settings: Settings, lines: asyncio.StreamReader,
                write: Callable[[dict[str, Any]], None]) -> None:
    """The relay's loop: messages from ``lines``, answers and beats through ``write``, until
    ``lines`` ends."""
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaProducer

    from state.store import RedisStore
    from stream.kafka_io import BatchSender, client_options, started
    from stream.outbox import OutboxPublisher

    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value(),
                                      decode_responses=True, socket_timeout=10,
                                      socket_connect_timeout=5)
    store = RedisStore(client, settings.namespace, 0, settings.state_format)
    error: list[str | None] = ["starting"]  # the last status sent (the first drain's is sent)

    async def beater() -> None:
        while True:
            write({"op": "beat"})
            await asyncio.sleep(BEAT_S)

    beats = asyncio.ensure_future(beater())
    while True:  # a broker that is not there yet: as the worker's own producer waits
        # the worker's faust producer settings (stream/faustconf.py)
        producer = AIOKafkaProducer(**client_options(settings), acks="all", linger_ms=5,
                                    max_batch_size=1_048_576)
        try:
            await started(producer)
            break
        except Exception as exc:
            log.warning("could not connect to Kafka (%r); retrying", exc)
            error[0] = f"relay: Kafka unreachable: {exc!r}"[:300]
            write({"op": "status", "error": error[0]})
            await asyncio.sleep(1.0)
    publisher = OutboxPublisher(
        store, BatchSender(producer).send, settings.segment_changes_topic,
        settings.customer_segments_topic, settings.dead_letter_topic,
        on_fenced=lambda p: write({"op": "fenced", "partition": p}))
    pending: set[int] = set()
    wake = asyncio.Event()

    async def drainer() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), DRAIN_EVERY_S)
            wake.clear()
            partitions = set(pending) or publisher.owned
            pending.clear()
            try:
                await publisher.drain(partitions)
                now = None
            except Exception as exc:  # the outbox keeps the entries; the next round retries
                now = repr(exc)[:300]
                log.warning("outbox not published yet (%r); will retry", exc)
            if now != error[0]:
                error[0] = now
                write({"op": "status", "error": now})

    tasks = [asyncio.ensure_future(drainer()), beats]
    try:
        while line := await lines.readline():
            message = json.loads(line)
            op, partitions = message["op"], message["partitions"]
            if op == "assign":
                await publisher.assign(partitions)
                pending.update(partitions)
                wake.set()
            elif op == "revoke":
                pending.difference_update(partitions)
                await publisher.revoke(partitions)
                write({"op": "revoked", "id": message["id"]})
            elif op == "drain":
                pending.update(partitions)
                wake.set()
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await producer.stop()
        await client.aclose()


async def _main() -> None:
    loop = asyncio.get_running_loop()
    lines = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), sys.stdin)
    # the messages' own copy of stdout; anything else printed goes to stderr (the log)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def write(message: dict[str, Any]) -> None:
        out.write(json.dumps(message).encode() + b"\n")  # small lines: the pipe takes them

    await serve(Settings(), lines, write)


def main() -> None:
    """``python -m stream.relay``: started by the worker (see the module docstring)."""
    # Ctrl-C in a terminal, or a SIGTERM to the process group (systemd, ``kill -- -PGID``),
    # reaches the relay too: the worker stops it (its input ends), it must not die of it first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] relay: %(message)s")
    asyncio.run(_main())


if __name__ == "__main__":
    main()
