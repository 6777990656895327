"""The worker's services, built once from the settings (Redis client, store, batch processor,
metrics), and what reads them without a faust app: a customer's view, the partition of a
customer id. Importing this module starts nothing (``stream.app`` creates the faust app at
import, as faust's worker command needs).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from state.rfm import frequency_monetary, recency_days
from state.store import RedisStore
from stream.kafka_io import key_partition
from stream.metrics import Metrics
from stream.pipeline import BatchProcessor
from stream.relay import Relay
from stream.segments import SegmentTable
from stream.settings import Settings
from stream.timeline import iso
from stream.validation import REASONS

log = logging.getLogger(__name__)


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
        """Mark the worker started (idempotent), and set the model version gauge to the
        snapshot in force (else it reads 0 until the worker's first step: a restarted, idle
        worker looked as if it had no model). Redis unreachable: the first step sets it."""
        self.started = True
        try:
            text = await self.store.load_model()
            if text:
                self.metrics.model_version.set(int(json.loads(text)["version"]))
        except (RedisError, ValueError, KeyError, TypeError) as exc:
            log.warning("model version not read at start (%s): set by the first step", exc)


def build_services(settings: Settings, metrics: Metrics | None = None,
                   replay: bool = False) -> Services:
    """Wire settings -> Redis client -> store -> processor (``replay``: changes are marked
    as a replay's)."""
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True,
                                     socket_timeout=10, socket_connect_timeout=5)
    store = RedisStore(client, settings.namespace, settings.cache_customers,
                       settings.state_format, settings.population_layout, settings.partitions,
                       window=bool(settings.window_days))
    table = SegmentTable.load(settings.segment_table)
    m = metrics or Metrics.create(prefix=settings.metrics_prefix, segments=table.segments,
                                  reasons=REASONS, partitions=settings.partitions,
                                  clusters=settings.n_clusters)
    processor = BatchProcessor(store, settings.input_rules(), table, settings.scoring(),
                               m, settings.partitions, settings.currency_decimals,
                               settings.limits, settings.time_policy(),
                               settings.max_due_per_step, settings.trainer(), replay)
    return Services(settings, store, processor, m)


def partition_for(customer_id: str, partitions: int) -> int:
    """Partition of a customer id under the default partitioner (murmur2)."""
    return key_partition(customer_id.encode("utf-8"), partitions)


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
