"""The faust app: the composition root (settings -> clients -> processor -> agent and views).

The agent is thin: it takes batches of raw records, groups them by partition, hands each group
to :class:`stream.pipeline.BatchProcessor` and sends what comes back (segment changes, dead
letters), waiting for the broker's acknowledgements before faust may commit the batch's
offsets. Agent concurrency is 1 per partition (faust-streaming issue #606: concurrency > 1 can
commit past a slow event); speed comes from batching.

Run with ``rfm-stream worker`` (or ``python -m stream worker``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import faust
import redis.asyncio as aioredis
from aiokafka.partitioner import murmur2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from state.store import RedisStore
from stream.clustering import CustomerClusterer
from stream.metrics import Metrics
from stream.pipeline import BatchProcessor, RawRecord
from stream.segments import SegmentTable
from stream.settings import Settings

log = logging.getLogger("rfm_stream")


@dataclass
class Services:
    """Everything the agent and the views use, built once from the settings."""

    settings: Settings
    store: RedisStore
    processor: BatchProcessor
    clusterer: CustomerClusterer
    metrics: Metrics
    saved_at_learned: int = 0
    started: bool = False

    async def start(self) -> None:
        """Load the latest model snapshot from Redis (idempotent)."""
        if self.started:
            return
        text = await self.store.load_model()
        if text:
            self.clusterer = CustomerClusterer.from_json(text)
            self.processor.clusterer = self.clusterer
            self.saved_at_learned = self.clusterer.n_learned
            log.info("loaded clustering model snapshot (%d updates learned)",
                     self.clusterer.n_learned)
        self.started = True

    async def save_model(self, force: bool = False) -> None:
        """Save a model snapshot when ``snapshot_every`` updates were learned (or ``force``)."""
        learned = self.clusterer.n_learned
        if learned == self.saved_at_learned:
            return
        if force or learned - self.saved_at_learned >= self.settings.snapshot_every:
            await self.store.save_model(self.clusterer.to_json())
            self.saved_at_learned = learned


def build_services(settings: Settings, metrics: Metrics | None = None) -> Services:
    """Wire settings -> Redis client -> store -> processor."""
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)
    store = RedisStore(client, settings.namespace, settings.limits)
    clusterer = CustomerClusterer(settings.n_clusters, settings.cluster_seed,
                                  settings.cluster_halflife, settings.cluster_min_customers)
    m = metrics or Metrics.create(prefix=settings.metrics_prefix)
    processor = BatchProcessor(store, settings.input_rules(),
                               SegmentTable.load(settings.segment_table),
                               settings.fixed_thresholds(), clusterer, m, settings.partitions,
                               settings.min_population, settings.currency_decimals)
    return Services(settings, store, processor, clusterer, m)


def partition_for(customer_id: str, partitions: int) -> int:
    """Partition of a customer id under the default partitioner (murmur2, as the Java client
    and aiokafka; librdkafka's default ``consistent_random`` differs)."""
    return (murmur2(customer_id.encode("utf-8")) & 0x7FFFFFFF) % partitions


def create_app(settings: Settings) -> tuple[faust.App, Services]:
    """Create the faust app with its agent and web views."""
    services = build_services(settings)
    app = faust.App(
        settings.app_id,
        broker=settings.kafka_url,
        key_serializer="raw",
        value_serializer="raw",
        web_bind=settings.web_bind,
        web_host=settings.web_bind,
        web_port=settings.web_port,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        topic_partitions=settings.partitions,
        producer_linger=0.005,
    )
    purchases = app.topic(settings.purchases_topic, partitions=settings.partitions,
                          key_type=bytes, value_type=bytes)
    dead_letters = app.topic(settings.dead_letter_topic, key_type=bytes, value_type=bytes)
    changes = app.topic(settings.segment_changes_topic, key_type=bytes, value_type=bytes)

    @app.agent(purchases, concurrency=1)
    async def process_purchases(stream: Any) -> None:
        await services.start()
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            by_partition: dict[int, dict[int, RawRecord]] = {}
            for ev in events:
                msg = ev.message
                # a rebalance can re-deliver an offset inside one buffer: keep the first copy
                by_partition.setdefault(msg.partition, {}).setdefault(
                    msg.offset, RawRecord(msg.topic, msg.partition, msg.offset, msg.key, msg.value))
            pending = []
            for partition, recs in by_partition.items():
                result = await services.processor.process(partition, sorted(
                    recs.values(), key=lambda r: r.offset))
                for dl in result.dead_letters:
                    pending.append(await dead_letters.send(
                        key=dl.key.encode() if dl.key and dl.key_encoding == "utf-8" else None,
                        value=dl.model_dump_json().encode()))
                for ch in result.changes:
                    pending.append(await changes.send(key=ch.customer_id.encode(),
                                                      value=ch.model_dump_json().encode()))
            # at least once: the batch is acknowledged (and its offsets committed) only after
            # the broker has acknowledged every record it produced
            await asyncio.gather(*pending)
            await services.save_model()

    @app.on_before_shutdown.connect
    async def _save_model_on_shutdown(sender: Any, **kwargs: Any) -> None:
        try:
            await services.save_model(force=True)
        except Exception:  # pragma: no cover - shutdown best effort, logged
            log.exception("could not save the clustering model snapshot on shutdown")

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        counts = await services.store.segment_counts(range(settings.partitions))
        for name in services.processor.table.segments:
            services.metrics.customers.labels(name).set(counts.get(name, 0))
        return web.bytes(generate_latest(services.metrics.registry),
                         content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health")
    async def health_view(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/segments")
    async def segments_view(web: Any, request: Any) -> Any:
        counts = await services.store.segment_counts(range(settings.partitions))
        table = services.processor.table
        return web.json({"rules_version": table.version, "segments": [
            {"segment": s.name, "customers": counts.get(s.name, 0), "strategy": s.strategy,
             "description": s.description} for s in table.segments.values()]})

    @app.page("/customers/{customer_id}")
    async def customer_view(web: Any, request: Any, customer_id: str) -> Any:
        partition = partition_for(customer_id, settings.partitions)
        found = await services.store.read_customer(partition, customer_id)
        if found is None:
            return web.json({"error": f"unknown customer {customer_id!r}"}, status=404)
        st = found.state
        body: dict[str, Any] = {
            "customer_id": customer_id, "partition": partition, "frequency": st.frequency,
            "monetary_minor": st.monetary_minor, "last_purchase_ms": st.last_purchase_ms,
            "first_purchase_ms": st.first_purchase_ms, "segment": found.segment,
            "cluster": found.cluster}
        as_of = await services.store.watermark(range(settings.partitions))
        if st.has_purchased and as_of is not None:
            (s,) = await services.processor.score([found], as_of)
            body.update(as_of_ms=as_of, recency_days=s.recency_days, r_score=s.r, f_score=s.f,
                        m_score=s.m, thresholds_version=s.thresholds_version)
        return web.json(body)

    return app, services


settings = Settings()
app, services = create_app(settings)
