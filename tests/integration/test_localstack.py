"""The embedded stack's processes do not outlive a launcher that is killed (SIGKILL leaves it no
chance to stop them itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux's")

LAUNCHER = """
import sys, time
from pathlib import Path
from stream import localstack
from stream.demo import local_settings
from stream.runner import start_worker
work = Path(sys.argv[1])
stack = localstack.start(work)
worker = start_worker(local_settings(stack, namespace="orphans"), work / "worker.log")
print(stack.broker.pid, stack.redis.pid, worker.pid, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may be slow to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_broker_redis_and_worker_stop_when_their_launcher_is_sigkilled(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        children = [int(p) for p in launcher.stdout.readline().split()]
        assert len(children) == 3 and all(running(p) for p in children)
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 30  # the worker shuts down cleanly on SIGTERM
        while any(running(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in children if running(p)]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid in children:  # whatever the outcome, stop what the launcher started
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    assert left == []
