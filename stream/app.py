"""The faust app: the composition root (settings -> clients -> processor -> consumer and views).

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
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import faust
import redis.asyncio as aioredis
from aiokafka.errors import KafkaError
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from state.rfm import frequency_monetary, recency_days
from state.store import ConflictError, RedisStore, UnreadableCustomers
from stream.allocator import freeze_gc
from stream.fastpath import BatchTransport
from stream.faustconf import faust_options
from stream.interleave import Report
from stream.kafka_io import client_options, key_partition, read_range
from stream.metrics import Metrics
from stream.pipeline import BatchProcessor, BatchResult, GapError, RawRecord
from stream.relay import KILL_SILENT_S as RELAY_KILL_SILENT_S
from stream.relay import SILENT_S as RELAY_SILENT_S
from stream.relay import Relay
from stream.segments import SegmentTable
from stream.settings import Settings
from stream.timeline import iso
from stream.validation import REASONS

log = logging.getLogger("rfm_stream")


class PartitionCountError(RuntimeError):
    """The purchases topic's partition count differs from ``RFM_PARTITIONS``."""


# retried as they are, never dead-lettered: the record is fine, its step could not commit
# (Redis or Kafka unreachable, or another writer of the partition during a rebalance)
RETRYABLE = (RedisError, OSError, KafkaError, ConflictError)
# another worker's report of a partition's event-time frontier older than this holds nobody
# back (its worker died or lost the partition; the partition's next owner reports it anew)
FRONTIER_MAX_AGE_MS = 30_000


@dataclass
class Services:
    """Everything the batch handler, timers and views use, built once from the settings."""

    settings: Settings
    store: RedisStore
    processor: BatchProcessor
    metrics: Metrics
    publisher: Relay | None = None
    started: bool = False
    redis_failing: bool = False
    outbox_error: str | None = None
    last_batch: float = field(default_factory=time.monotonic)
    last_step: dict[int, float] = field(default_factory=dict)  # partition -> monotonic time

    async def start(self) -> None:
        """Mark the worker started (idempotent)."""
        self.started = True


def build_services(settings: Settings, metrics: Metrics | None = None,
                   replay: bool = False) -> Services:
    """Wire settings -> Redis client -> store -> processor (``replay``: changes are marked
    as a replay's)."""
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True,
                                     socket_timeout=10, socket_connect_timeout=5)
    store = RedisStore(client, settings.namespace, settings.cache_customers,
                       settings.state_format)
    table = SegmentTable.load(settings.segment_table)
    m = metrics or Metrics.create(prefix=settings.metrics_prefix, segments=table.segments,
                                  reasons=REASONS, partitions=settings.partitions,
                                  clusters=settings.n_clusters)
    processor = BatchProcessor(store, settings.input_rules(), table, settings.scoring(),
                               m, settings.partitions, settings.currency_decimals,
                               settings.limits, settings.time_policy(),
                               settings.max_due_per_step, settings.trainer(), replay)
    return Services(settings, store, processor, m)


# reread(partition, start, end) -> the records (offset, key, value) of the purchases topic's
# partition with start <= offset < end (stream.kafka_io.read_range)
ReRead = Callable[[int, int, int], Awaitable[list[tuple[int, bytes | None, bytes | None]]]]


class PartitionRunner:
    """How the worker gets one partition's records applied: :meth:`process` retries what is
    retryable, re-reads a gap from the topic first, and isolates a record whose processing
    fails (a ``processing_error`` dead letter).

    Parameters
    ----------
    services
        The worker's services (its processor; ``redis_failing`` is set while retrying).
    reread
        ``reread(partition, start, end)``: the purchases topic's records ``(offset, key,
        value)`` of the partition with ``start <= offset < end`` (``read_range``).
    """

    def __init__(self, services: Services, reread: ReRead):
        self.services, self.reread = services, reread

    async def process(self, partition: int, records: list[RawRecord]) -> BatchResult:
        """Process one partition's records (ascending offsets) until they are applied.

        Retries, with exponential backoff (0.1 s doubling, at most 5 s) and without limit,
        whatever is :data:`RETRYABLE` (Redis or Kafka unreachable, a commit conflict with
        another writer of the partition); the records of customers whose stored values are
        unreadable are dead-lettered as ``processing_error`` and the others applied together;
        any other record is dead-lettered only when processing it alone fails otherwise.
        Returns the changes and dead letters committed (``applied``/``duplicates`` are not
        summed here).
        """
        async for attempt in AsyncRetrying(
                wait=wait_exponential(multiplier=0.1, max=5),
                retry=retry_if_exception_type(RETRYABLE),
                before_sleep=lambda rs: self._retrying(
                    rs.outcome.exception() if rs.outcome else None)):
            with attempt:
                try:
                    result = await self.without_unreadable(partition, records)
                except RETRYABLE:
                    raise
                except Exception as exc:
                    log.exception("batch of partition %d failed; processing its records one by "
                                  "one", partition)
                    result = await self.one_by_one(partition, records, exc)
        self.services.redis_failing = False
        return result

    async def without_unreadable(self, partition: int, records: list[RawRecord]
                                 ) -> BatchResult:
        """Process; the records of customers whose stored values turn out unreadable are
        dead-lettered (``processing_error``, with why; one log line per customer) and the
        others processed again together: one more step per round of such customers, where
        processing each record alone cost a step per record (a partition with 1% of such
        events caught up five times slower) and a traceback each."""
        rejected: dict[str, tuple[str, str]] = {}
        while True:
            try:
                return await self.process_filling_gaps(partition, records, rejected)
            except UnreadableCustomers as exc:
                if exc.reasons.keys() <= rejected.keys():
                    raise  # not from these records' customers: no progress this way
                for cid, reason in exc.reasons.items():
                    log.error("%s: its records are dead-lettered (processing_error)", reason)
                    rejected[cid] = ("processing_error", f"{type(exc).__name__}: {reason}")

    async def process_filling_gaps(self, partition: int, records: list[RawRecord],
                                   rejected: Mapping[str, tuple[str, str]] | None = None
                                   ) -> BatchResult:
        """Process; when records start beyond Redis's applied offset + 1, read the missing
        range from the topic and apply it first (repeatedly, until nothing more is found).
        ``rejected``: customers whose valid records are dead letters (``reject_customers``)."""
        processor, topic = self.services.processor, self.services.settings.purchases_topic
        total, check = BatchResult(), True
        while True:
            try:
                result = await processor.process(partition, records, check_gap=check,
                                                 reject_customers=rejected)
            except GapError as gap:
                log.warning("%s: re-reading the missing records from the topic", gap)
                missing = await self.reread(partition, gap.expected, gap.got)
                if not missing:
                    check = False  # the offsets in between hold no record
                    continue
                filled = await processor.process(
                    partition, [RawRecord(topic, partition, o, k, v) for o, k, v in missing],
                    check_gap=False, reject_customers=rejected)
                total.changes += filled.changes
                total.dead_letters += filled.dead_letters
                continue
            total.changes += result.changes
            total.dead_letters += result.dead_letters
            return total

    async def one_by_one(self, partition: int, records: list[RawRecord], first: Exception
                         ) -> BatchResult:
        """Process each record alone; one whose processing fails (not retryably) becomes a
        ``processing_error`` dead letter. Retryable errors propagate."""
        total = BatchResult()
        for rec in records:
            try:
                r = await self.process_filling_gaps(partition, [rec])
            except RETRYABLE:
                raise
            except Exception as exc:
                log.exception("record %s[%d]@%d cannot be processed: dead-lettered", rec.topic,
                              rec.partition, rec.offset)
                r = await self.services.processor.process(
                    partition, [rec], check_gap=False,
                    reject={rec.offset: ("processing_error", f"{type(exc).__name__}: {exc}")})
            total.changes += r.changes
            total.dead_letters += r.dead_letters
        return total

    def _retrying(self, exc: BaseException | None) -> None:
        if isinstance(exc, ConflictError):
            log.warning("%s: another writer keeps committing to the partition (a rebalance); "
                        "re-reading", exc)
            return
        if isinstance(exc, KafkaError):
            log.warning("re-reading from Kafka failed (%r); retrying", exc)
            return
        self.services.redis_failing = True
        log.warning("Redis unavailable (%r); retrying, consuming nothing meanwhile", exc)


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


def partition_for(customer_id: str, partitions: int) -> int:
    """Partition of a customer id under the default partitioner (murmur2)."""
    return key_partition(customer_id.encode("utf-8"), partitions)


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

    @app.on_partitions_assigned.connect
    async def _seek_to_redis(sender: Any, assigned: Any = (), **kwargs: Any) -> None:
        """Check the partition count, then seek each assigned partition to Redis's last
        applied offset + 1. One receiver, in that order: faust calls the receivers of a
        signal in no set order, and a seek sent to the consumer's thread after a crash from
        another receiver waited out the thread's 60 s stop timeout (a test's worker took 67 s,
        in CI over 180 s, to stop)."""
        if not await partition_count_ok():
            return
        mine = [tp for tp in assigned if tp.topic == settings.purchases_topic]
        if not mine:
            return
        try:
            meta = await services.store.partition_meta([tp.partition for tp in mine])
        except RedisError as exc:
            log.warning("could not read applied offsets on assignment (%r)", exc)
            return
        # nothing applied yet: offset 0, which resets to the log start if it is gone. Records
        # already fetched from the group's offset may still arrive: the offset check skips old
        # ones and the gap check re-reads what lies before new ones. seek_wait runs on the
        # consumer's own thread: faust's plain seek() touches aiokafka's fetcher from this
        # thread, which races with a fetch in progress (KeyError in fetched_records,
        # robinhood/aiokafka#19) and crashes the worker.
        targets = {tp: meta[tp.partition][0] + 1 for tp in mine}
        try:
            await app.consumer.seek_wait(targets)
        except Exception as exc:  # never crash the worker over an optimisation
            log.warning("could not seek to Redis's applied offsets (%r)", exc)
            return
        for tp, target in targets.items():
            log.info("seek %s[%d] to %d (Redis's last applied offset + 1)", tp.topic,
                     tp.partition, target)
            if target > 0:  # what is applied (a restarted worker's gauge read 0 until a batch)
                services.metrics.applied_offset.labels(str(tp.partition)).set(target - 1)

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

    def authorized(request: Any) -> bool:
        """Bearer token check (RFM_HTTP_TOKEN) for every endpoint but /health."""
        token = settings.http_token
        if token is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode())

    def denied(web: Any) -> Any:
        return web.json({"error": "unauthorized: send Authorization: Bearer <RFM_HTTP_TOKEN>"},
                        status=401)

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        if not authorized(request):
            return denied(web)
        m = services.metrics
        try:  # gauges read from Redis; while it is unreachable the rest is still served
            parts = range(settings.partitions)
            counts = await asyncio.wait_for(services.store.segment_counts(parts), 2)
            for name in services.processor.table.segments:
                m.customers.labels(name).set(counts.get(name, 0))
            m.outbox_depth.set(await asyncio.wait_for(services.store.outbox_depth(parts), 2))
            lags = await consumer_lag()
            for p in range(settings.partitions):  # a series only where the lag is known
                if p in lags:
                    m.consumer_lag.labels(str(p)).set(lags[p])
                else:
                    with contextlib.suppress(KeyError):  # no series yet
                        m.consumer_lag.remove(str(p))
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("/metrics: Redis gauges not refreshed (%r)", exc)
        alignment = cast(BatchTransport, app.transport).alignments.get(settings.purchases_topic)
        for p in range(settings.partitions):
            m.held_back.labels(str(p)).set(alignment.held_back(p) if alignment else 0)
        model = services.processor.model
        if model is not None:
            for prof in model.profiles:
                m.cluster_customers.labels(str(prof["cluster"])).set(prof.get("size") or 0)
        return web.bytes(generate_latest(m.registry),
                         content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health")
    async def health_view(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/ready")
    async def ready_view(web: Any, request: Any) -> Any:
        if not authorized(request):
            return denied(web)
        problems = []
        if services.redis_failing:
            problems.append("redis unavailable (retrying)")
        else:
            try:
                await asyncio.wait_for(services.store.client.ping(), 2)
            except Exception as exc:
                problems.append(f"redis ping failed: {exc!r}")
        if services.outbox_error:
            problems.append(f"outbox not published (retrying): {services.outbox_error}")
        relay = services.publisher
        if relay is not None and relay.silent_s() > RELAY_SILENT_S:
            problems.append(f"outbox relay silent for {relay.silent_s():.0f} s (stopped or "
                            f"hung; replaced at {RELAY_KILL_SILENT_S:.0f} s)")
        if not services.started:
            problems.append("consumer not started")
        else:
            try:
                waiting = sum((await consumer_lag()).values())
            except (TimeoutError, RedisError, OSError):
                waiting = 0  # Redis trouble is reported above
            idle = time.monotonic() - services.last_batch
            if waiting and idle > settings.ready_stall_s:
                problems.append(f"{waiting} records wait but no batch was applied for "
                                f"{idle:.0f} s (stuck?)")
        body = {"ready": not problems, "problems": problems,
                "partitions": sorted(owned_partitions()) if services.started else []}
        return web.json(body, status=200 if not problems else 503)

    @app.page("/segments")
    async def segments_view(web: Any, request: Any) -> Any:
        if not authorized(request):
            return denied(web)
        counts = await services.store.segment_counts(range(settings.partitions))
        table = services.processor.table
        return web.json({"rules_version": table.version, "segments": [
            {"segment": s.name, "customers": counts.get(s.name, 0), "strategy": s.strategy,
             "description": s.description} for s in table.segments.values()]})

    @app.page("/clusters")
    async def clusters_view(web: Any, request: Any) -> Any:
        if not authorized(request):
            return denied(web)
        text = await services.store.load_model()
        if text is None:
            return web.json({"model_version": None, "clusters": []})
        snap = json.loads(text)
        return web.json({"model_version": snap.get("version"), "as_of_ms": snap.get("as_of_ms"),
                         "population": snap.get("population"),
                         "clusters": snap.get("profiles", [])})

    @app.page("/customers/{customer_id:[^/]+}")
    async def customer_view(web: Any, request: Any, customer_id: str) -> Any:
        if not authorized(request):
            return denied(web)
        body, status = await customer_json(services, customer_id)
        return web.json(body, status=status)

    return app, services


async def customer_json(services: Services, customer_id: str) -> tuple[dict[str, Any], int]:
    """One customer's state, scores at the watermark, segment and cluster; (body, status):
    404 for an unknown customer, 500 when its stored value cannot be decoded."""
    settings = services.settings
    # the default partitioner's choice first; a producer may have partitioned otherwise
    first = partition_for(customer_id, settings.partitions)
    found = None
    try:
        for partition in [first, *(p for p in range(settings.partitions) if p != first)]:
            found = await services.store.read_customer(partition, customer_id)
            if found is not None:
                break
    except ValueError as exc:  # a value written by hand, or by a bug
        return {"error": "unreadable stored value", "customer_id": customer_id,
                "detail": str(exc)}, 500
    if found is None:
        return {"error": "unknown customer", "customer_id": customer_id}, 404
    st = found.state
    segment = services.processor.table.segments.get(found.segment or "")
    body: dict[str, Any] = {
        "customer_id": customer_id, "partition": partition, "frequency": st.frequency,
        "monetary": units(st.monetary_minor, settings.currency_decimals),
        "currency": settings.currency, "last_purchase_at": iso(st.last_purchase_ms),
        "first_purchase_at": iso(st.first_purchase_ms), "segment": found.segment,
        "strategy": segment.strategy if segment else None, "cluster": found.cluster,
        "monetary_minor": st.monetary_minor, "last_purchase_ms": st.last_purchase_ms,
        "first_purchase_ms": st.first_purchase_ms}
    as_of = await services.store.as_of(range(settings.partitions))
    if st.last_purchase_ms is not None and as_of is not None:
        thresholds = await services.processor.current_thresholds(partition)
        days = recency_days(st.last_purchase_ms, as_of)
        f, m = frequency_monetary(st, as_of, services.processor.policy.window)
        r, fs, ms = thresholds.score(thresholds.scoring_days(st.last_purchase_ms, as_of), f, m)
        body.update(as_of=iso(as_of), as_of_ms=as_of, recency_days=days, frequency_in_window=f,
                    monetary_in_window=units(m, settings.currency_decimals),
                    monetary_minor_in_window=m, r_score=r, f_score=fs, m_score=ms,
                    thresholds_version=thresholds.version)
    return body, 200


def units(minor: float, decimals: int) -> str:
    """An amount in minor units as a decimal string of currency units.

    >>> units(123456, 2), units(5, 0), units(0, 3)
    ('1234.56', '5', '0.000')
    """
    return str(Decimal(minor).scaleb(-decimals))


settings = Settings()
app, services = create_app(settings)
