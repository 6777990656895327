"""Run worker processes and wait for them to catch up: shared by ``make demo``, tests and bench.

A worker is a real ``rfm-stream worker`` process (faust), configured only through ``RFM_*``
environment variables, and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from state.keys import PartitionKeys, alias_key
from state.store import RedisStore
from stream import localstack
from stream.settings import Settings


class WorkerError(RuntimeError):
    """A worker process exited or did not catch up in time."""


def settings_env(settings: Settings) -> dict[str, str]:
    """``RFM_*`` environment variables that reproduce ``settings`` in another process."""
    env = {}
    for name, value in settings.model_dump(mode="python").items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, tuple | list):
            value = "[" + ",".join(str(v) for v in value) + "]"
        env[f"RFM_{name.upper()}"] = str(value)
    return env


@dataclass
class WorkerProcess:
    """A running worker; ``log_path`` holds its output."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM (faust shuts down cleanly, saving the model snapshot), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_worker(settings: Settings, log_path: Path, extra_env: Mapping[str, str] | None = None
                 ) -> WorkerProcess:
    """Start ``python -m stream worker`` with ``settings`` passed as environment variables."""
    return spawn_with_settings([sys.executable, "-m", "stream", "worker"], settings, log_path,
                               extra_env)


def spawn_with_settings(argv: Sequence[str], settings: Settings, log_path: Path,
                        extra_env: Mapping[str, str] | None = None) -> WorkerProcess:
    """Start ``argv`` with ``settings`` as ``RFM_*`` environment variables (none inherited) and
    ``extra_env``, its output in ``log_path`` (``localstack.spawn``: a session of its own, so
    Ctrl-C reaches the caller, which stops it before the servers it needs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFM_")}
    env.update(settings_env(settings))
    env.update(extra_env or {})
    return WorkerProcess(localstack.spawn(argv, log_path, env), log_path)


def store_for(settings: Settings) -> RedisStore:
    """A store on the settings' Redis and namespace (the caller closes ``store.client``)."""
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    return RedisStore(client, settings.namespace, write_format=settings.state_format,
                      population_layout=settings.population_layout,
                      partitions=settings.partitions, window=bool(settings.window_days))


async def wait_applied(store: RedisStore, targets: Mapping[int, int],
                       workers: list[WorkerProcess], timeout_s: float = 300.0,
                       progress: Callable[[int], None] | None = None) -> None:
    """Wait until Redis's last applied offset of each partition reaches ``targets`` and their
    outboxes are empty (every segment change and dead letter published).

    ``progress`` receives the number of records applied so far (sum over partitions).

    Raises
    ------
    WorkerError
        When every worker has exited, or on timeout (with the last worker's log tail).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        meta = await store.partition_meta(targets)
        if progress:
            progress(sum(off + 1 for off, _ in meta.values()))
        if all(meta[p][0] >= t for p, t in targets.items()) \
                and await store.outbox_depth(targets) == 0:
            return
        if workers and not any(w.alive() for w in workers):
            raise WorkerError("every worker exited:\n" + workers[-1].log_tail())
        if time.monotonic() > deadline:
            tail = workers[-1].log_tail() if workers else ""
            raise WorkerError(f"workers did not catch up in {timeout_s} s: {meta} vs "
                              f"{dict(targets)}\n{tail}")
        await asyncio.sleep(0.2)


def resolve_namespace(settings: Settings) -> Settings:
    """The settings with the namespace its name resolves to (``rfm-stream replay --switch``
    points a name at a rebuilt namespace); unchanged when no alias is set.

    Raises
    ------
    redis.exceptions.RedisError
        When Redis is unreachable.
    ValueError
        When the alias key holds another Redis type or a value that is not a namespace
        (written by hand).
    """
    import redis

    key = alias_key(settings.namespace)
    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True,
                                  socket_timeout=10, socket_connect_timeout=5)
    try:
        target = client.get(key)
    except redis.ResponseError as exc:  # WRONGTYPE: Redis answered, the key is not a string
        raise ValueError(f"the namespace alias {key!r} is not a string ({exc}); `replay "
                         "--switch` writes it: delete it or set it to a namespace") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"the namespace alias {key!r} is not text: delete it or set it to a "
                         "namespace") from exc
    finally:
        client.close()
    if not target or target == settings.namespace:
        return settings
    try:
        PartitionKeys(target, 0)
    except ValueError as exc:
        raise ValueError(f"the namespace alias {key!r} names {target!r}, which is not a "
                         "namespace: delete it or set it to one") from exc
    return settings.model_copy(update={"namespace": str(target)})
