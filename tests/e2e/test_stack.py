"""``rfm-stream stack``: the embedded broker and Redis on their own, with the topics created,
for trying the other commands by hand; both stop with it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import redis
from aiokafka import AIOKafkaConsumer


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _partitions(bootstrap: str, topic: str) -> set[int] | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return consumer.partitions_for_topic(topic) if topic in await consumer.topics() else None
    finally:
        await consumer.stop()


def test_stack_serves_a_broker_with_the_topics_and_redis_then_stops_both(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFM_")}
    env["RFM_PARTITIONS"] = "3"
    proc = subprocess.Popen([sys.executable, "-m", "stream", "stack", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the export line comes once the topics exist
        urls = dict(re.findall(r"(RFM_\w+)=(\S+)", line))
        assert set(urls) == {"RFM_KAFKA_URL", "RFM_REDIS_URL"}, line + proc.stderr.read()
        note = proc.stderr.readline()
        pids = [int(p) for p in re.findall(r"pid (\d+)", note)]
        assert len(pids) == 2 and all(map(_alive, pids)), note

        assert redis.Redis.from_url(urls["RFM_REDIS_URL"]).ping()
        bootstrap = urls["RFM_KAFKA_URL"].removeprefix("kafka://")
        assert asyncio.run(_partitions(bootstrap, "purchases")) == {0, 1, 2}
        assert asyncio.run(_partitions(bootstrap, "segment-changes")) == {0}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not any(map(_alive, pids)), pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
