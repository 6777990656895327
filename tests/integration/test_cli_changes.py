"""``rfm-stream changes``: what is on the segment-changes topic, against the real broker (a
fresh user: after ``stack``, ``worker`` and ``load`` nothing showed the service's main output)."""

from __future__ import annotations

import asyncio
import json

from click.testing import CliRunner

from stream.cli import main
from stream.demo import ensure_topics
from stream.kafka_io import Message, bootstrap_of, produce


def env_of(s) -> dict[str, str]:
    return {"RFM_KAFKA_URL": s.kafka_url, "RFM_REDIS_URL": s.redis_url.get_secret_value(),
            "RFM_NAMESPACE": s.namespace, "RFM_SEGMENT_CHANGES_TOPIC": s.segment_changes_topic}


async def test_changes_prints_every_change_on_the_topic_once_in_order(settings):
    await ensure_topics(settings)
    sent = [{"change_id": f"c{i}", "customer_id": "kim", "current": {"segment": seg}}
            for i, seg in enumerate(["New Customers", "Potential Loyalists", "Champions"])]
    await produce(bootstrap_of(settings.kafka_url), settings.segment_changes_topic,
                  [Message(b"kim", json.dumps(c).encode()) for c in sent])
    shown = await asyncio.to_thread(CliRunner().invoke, main, ["changes"],
                                    env=env_of(settings))
    assert shown.exit_code == 0, shown.output
    assert [json.loads(line) for line in shown.output.splitlines()] == sent


async def test_changes_of_a_topic_that_does_not_exist_is_a_clean_error(settings):
    env = {**env_of(settings), "RFM_SEGMENT_CHANGES_TOPIC": "no-such-topic-here"}
    shown = await asyncio.to_thread(CliRunner().invoke, main, ["changes"], env=env)
    assert shown.exit_code == 1 and "no-such-topic-here" in shown.output, shown.output
    assert "Traceback" not in shown.output


async def test_changes_of_an_empty_topic_prints_nothing_and_returns(settings):
    await ensure_topics(settings)
    shown = await asyncio.wait_for(asyncio.to_thread(CliRunner().invoke, main, ["changes"],
                                                     env=env_of(settings)), 60)
    assert shown.exit_code == 0 and shown.output == "", shown.output


async def test_changes_into_a_pipe_closed_early_ends_cleanly(settings):
    """``rfm-stream changes | head -2`` exited with 1 and nothing said (a fresh user): a
    reader that is done is not an error."""
    import os
    import subprocess
    import sys

    await ensure_topics(settings)
    await produce(bootstrap_of(settings.kafka_url), settings.segment_changes_topic,
                  [Message(b"kim", json.dumps({"n": i, "pad": "x" * 40}).encode())
                   for i in range(20_000)])  # ~1 MB: far more than a pipe holds
    proc = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "stream", "changes"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env_of(settings)})
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = await asyncio.to_thread(proc.stdout.readline)
        proc.stdout.close()
        code = await asyncio.to_thread(proc.wait, 60)
        err = await asyncio.to_thread(proc.stderr.read)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads(first)["n"] == 0
    assert code == 0 and b"Traceback" not in err and b"Error" not in err, err[-2000:]


def test_changes_with_no_broker_is_a_clean_error(settings):
    """A breaker: aiokafka's traceback instead of the clean error ``load`` gives."""
    from stream import localstack

    env = {**env_of(settings), "RFM_KAFKA_URL": f"kafka://127.0.0.1:{localstack.free_port()}"}
    shown = CliRunner().invoke(main, ["changes"], env=env)
    assert shown.exit_code == 1 and "Kafka unreachable" in shown.output, shown.output
    assert "Traceback" not in shown.output
