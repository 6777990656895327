"""The faust app: the composition root (settings -> services -> consumer, timers and views).

faust owns the consumer group, the fetching and the offset commits; the purchases topic is
delivered one fetched batch at a time (:mod:`stream.fastpath`, not an agent: faust's
per-event path costs more than the service's own work per event). The batch handler groups
records by partition and hands each group to :class:`stream.pipeline.BatchProcessor` (which
commits state, offset, assignments and outbox entries atomically to Redis), the partitions of
a batch concurrently; then the outbox relay (:mod:`stream.relay`, a process of its own) sends
what the batch produced while the next batch is processed. faust commits a batch's offsets
only after the handler returned.

Delivery (README "Guarantees"): Redis, not the broker's committed offset, is the source of truth.
On assignment the worker seeks to Redis's last applied offset + 1; when the records delivered
start beyond it (Redis lost writes, or the group committed past it), the missing range is
re-read from the topic before going on. While Redis is unreachable the worker retries with
backoff and commits nothing; ``/ready`` says so.

Run with ``rfm-stream worker`` (or ``python -m stream worker``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faust
from faust.types import TP
from redis.exceptions import RedisError

from stream.allocator import freeze_gc
from stream.fastpath import BatchTransport
from stream.faustconf import faust_options
from stream.interleave import Report
from stream.kafka_io import client_options, read_range
from stream.partition_runner import PartitionRunner
from stream.pipeline import RawRecord
from stream.relay import Relay
from stream.services import Services, build_services
from stream.settings import Settings
from stream.web import add_views

log = logging.getLogger("rfm_stream")


class PartitionCountError(RuntimeError):
    """The purchases topic's partition count differs from ``RFM_PARTITIONS``."""


# another worker's report of a partition's event-time frontier older than this holds nobody
# back (its worker died or lost the partition; the partition's next owner reports it anew)
FRONTIER_MAX_AGE_MS = 30_000


def lag_by_partition(ends: Mapping[int, int | None], applied: Mapping[int, int]
                     ) -> dict[int, int]:
    """Consumer lag in records of the partitions a worker owns (``ends``: each one's end
    offset as its fetches last saw it, None before the first) against the last offset
    applied in Redis (-1: none): only partitions whose end is known. Before this, a
    partition not owned, or not fetched yet, read 0, which looks like "caught up" (a
    breaker's finding: every partition read 0 for ~30 s before a restarted worker's
    assignment).

    >>> lag_by_partition({0: 100, 1: None, 3: 5}, {0: 49, 1: 7, 2: 9, 3: 10})
    {0: 50, 3: 0}
    """
    return {p: max(0, end - applied.get(p, -1) - 1) for p, end in ends.items()
            if end is not None}


def create_app(settings: Settings) -> tuple[faust.App, Services]:
    """Create the faust app with its batch handler, timers and web views."""
    services = build_services(settings)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = faust.App(settings.app_id, **faust_options(settings))
    purchases = app.topic(settings.purchases_topic, partitions=settings.partitions,
                          key_type=bytes, value_type=bytes)

    def publishing(error: str | None) -> None:
        services.outbox_error = error

    services.publisher = Relay(settings, publishing, services.metrics.relay_restarts.inc)
    kafka = client_options(settings)  # the re-read of a gap connects as the worker does

    def owned_partitions() -> set[int]:
        """The partitions assigned and not since revoked (during a rebalance: none of those
        revoked, where the consumer's assignment still listed them for ~15 s)."""
        assert services.publisher is not None
        return services.publisher.owned

    runner = PartitionRunner(
        services, lambda p, start, end: read_range(kafka, settings.purchases_topic, p,
                                                   start, end))
    process = runner.process

    async def publish_outbox(partitions: set[int]) -> None:
        assert services.publisher is not None
        await services.publisher.drain(partitions)

    async def process_batch(messages: list[Any]) -> None:
        """One fetched batch of the purchases topic (see :mod:`stream.fastpath`): each
        partition's records, concurrently (one plans while another waits for Redis); then the
        batch's outbox is published while the next batch is processed. The records are
        acknowledged to faust (whose commit timer commits their offsets) only after this
        returns, that is after their state, changes and dead letters are committed in Redis."""
        by_partition: dict[int, dict[int, RawRecord]] = {}
        for msg in messages:
            # a rebalance can re-deliver an offset inside one batch: keep the first copy
            by_partition.setdefault(msg.partition, {}).setdefault(
                msg.offset, RawRecord(msg.topic, msg.partition, msg.offset, msg.key, msg.value))
        try:
            await asyncio.gather(*(process(partition, sorted(recs.values(),
                                                             key=lambda r: r.offset))
                                   for partition, recs in by_partition.items()))
        except Exception as exc:
            # never let faust commit offsets of records that were not applied: Redis holds
            # what was applied; a restarted worker seeks there
            log.critical("unrecoverable error, exiting without committing: %r", exc)
            os._exit(70)
        services.last_batch = time.monotonic()
        for partition in by_partition:
            services.last_step[partition] = services.last_batch
        await publish_outbox(set(by_partition))

    app.transport = BatchTransport(app.conf.broker_consumer, app,
                                   fetch_max_wait_ms=settings.fetch_max_wait_ms,
                                   max_skew_ms=settings.live_max_skew_s * 1000)
    app.transport.batch_handlers[settings.purchases_topic] = process_batch
    app.topics.add(purchases)

    async def exchange_frontiers(topic: str, own: dict[int, Report]
                                 ) -> dict[int, tuple[float, int, int]]:
        """The other workers' partitions, for the event-time alignment (stream.fastpath)."""
        if len(own) >= settings.partitions:  # this worker owns them all
            return {}
        return await services.store.exchange_frontiers(
            own, settings.partitions, int(time.time() * 1000), FRONTIER_MAX_AGE_MS)

    app.transport.frontier_exchange = exchange_frontiers

    @app.task
    async def _started() -> None:
        if settings.gc_freeze:
            freeze_gc()
        await services.start()

    @app.timer(settings.sweep_interval_s)
    async def sweep_timer() -> None:
        """Re-score the owned partitions' customers that fell due without an event of their
        own (the watermark moved on other partitions, or the wall clock moved)."""
        if not services.started:
            return
        mine = owned_partitions()
        # a partition whose own batches keep coming fires its dues in those steps
        busy = {p for p, t in services.last_step.items()
                if time.monotonic() - t < settings.sweep_interval_s}
        for partition in sorted(mine - busy):
            try:
                await services.processor.sweep(partition)
            except (RedisError, OSError) as exc:
                log.warning("sweep of partition %d failed (%r); will retry", partition, exc)
                return
            except Exception:  # the next tick retries; consuming goes on
                log.exception("sweep of partition %d failed", partition)
                return
        await publish_outbox(mine)

    async def partition_count_ok() -> bool:
        """Stop the worker (False) when the purchases topic's partition count is not
        RFM_PARTITIONS: state keys, population queries and the watermark cover
        ``range(settings.partitions)`` only, so a record of another partition would be applied
        where nothing reads it."""
        found = app.consumer.topic_partitions(settings.purchases_topic)
        if found is not None and found != settings.partitions:
            reason = PartitionCountError(
                f"topic {settings.purchases_topic!r} has {found} partitions but "
                f"RFM_PARTITIONS is {settings.partitions}: they must be equal")
            log.critical("%s; the worker stops", reason)
            await app.crash(reason)
            return False
        return True

    async def seek_to_redis(assigned: Any) -> None:
        """Seek each assigned partition of the purchases topic to Redis's last applied offset
        + 1 (nothing applied yet: offset 0, which resets to the log start if it is gone).
        Records already fetched from another offset may still arrive: the offset check skips
        old ones and the gap check re-reads what lies before new ones. seek_wait runs on the
        consumer's own thread: faust's plain seek() touches aiokafka's fetcher from this
        thread, which races with a fetch in progress (KeyError in fetched_records,
        robinhood/aiokafka#19) and crashes the worker."""
        mine = [tp for tp in assigned if tp.topic == settings.purchases_topic]
        if not mine:
            return
        try:
            meta = await services.store.partition_meta([tp.partition for tp in mine])
        except RedisError as exc:
            log.warning("could not read applied offsets on assignment (%r)", exc)
            return
        targets = {tp: meta[tp.partition][0] + 1 for tp in mine}
        try:
            await app.consumer.seek_wait(targets)
        except Exception as exc:  # never crash the worker over a seek: the gap check remains
            log.warning("could not seek to Redis's applied offsets (%r)", exc)
            return
        for tp, target in targets.items():
            log.info("seek %s[%d] to %d (Redis's last applied offset + 1)", tp.topic,
                     tp.partition, target)
            if target > 0:  # what is applied (a restarted worker's gauge read 0 until a batch)
                services.metrics.applied_offset.labels(str(tp.partition)).set(target - 1)

    @app.on_partitions_assigned.connect
    async def _seek_to_redis(sender: Any, assigned: Any = (), **kwargs: Any) -> None:
        """Check the partition count, then seek to Redis's applied offsets. One receiver, in
        that order: faust calls the receivers of a signal in no set order, and a seek sent to
        the consumer's thread after a crash from another receiver waited out the thread's 60
        s stop timeout (a test's worker took 67 s, in CI over 180 s, to stop)."""
        if await partition_count_ok():
            await seek_to_redis(assigned)

    seeks: set[asyncio.Task[None]] = set()
    rebalance_end = app.on_rebalance_end

    def _seek_again_when_rebalanced() -> None:
        """faust's recovery seeks the assigned partitions to the group's committed offsets
        after the assignment signal, or while its receivers run (``perform_seek``), and so
        can undo their seek: seek again once the rebalance has ended. Else a partition whose
        group offset is past Redis's (a new namespace, a Redis that lost writes while the
        workers were stopped) applied nothing until a new record showed the gap."""
        rebalance_end()
        task = asyncio.ensure_future(seek_to_redis(app.consumer.assignment()))
        seeks.add(task)
        task.add_done_callback(seeks.discard)

    app.on_rebalance_end = _seek_again_when_rebalanced  # type: ignore[method-assign]

    @app.on_partitions_assigned.connect
    async def _claim_outboxes(sender: Any, assigned: Any = (), **kwargs: Any) -> None:
        """Publish the assigned partitions' outboxes, claimed in Redis first (fencing out a
        previous owner that has not seen the rebalance yet; see OutboxPublisher)."""
        assert services.publisher is not None
        await services.publisher.assign(
            tp.partition for tp in assigned if tp.topic == settings.purchases_topic)

    @app.on_partitions_revoked.connect
    async def _stop_publishing(sender: Any, revoked: Any = (), **kwargs: Any) -> None:
        """Stop publishing the revoked partitions' outboxes; returns once the publication in
        flight is acknowledged, so faust rejoins the group (and the partitions reach their
        next owner) only after it."""
        assert services.publisher is not None
        await services.publisher.revoke(
            tp.partition for tp in revoked if tp.topic == settings.purchases_topic)

    @app.on_before_shutdown.connect
    async def _stop_publishing_all(sender: Any, **kwargs: Any) -> None:
        # a stopping worker leaves the group without a revocation: the same, before it leaves
        assert services.publisher is not None
        await services.publisher.revoke(services.publisher.owned)
        await services.publisher.stop()

    async def consumer_lag() -> dict[int, int]:
        """Records behind the end of each owned partition whose end is known."""
        parts = range(settings.partitions)
        applied = await asyncio.wait_for(services.store.partition_meta(parts), 2)
        owned = owned_partitions() if services.started else set()
        ends = {p: app.consumer.highwater(TP(settings.purchases_topic, p)) for p in owned}
        return lag_by_partition(ends, {p: applied[p][0] for p in parts})

    add_views(app, services, consumer_lag, owned_partitions)
    return app, services


settings = Settings()
app, services = create_app(settings)
