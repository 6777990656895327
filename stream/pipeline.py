"""One partition batch through the whole path: validate -> RFM update -> score -> segment ->
cluster -> compare-and-set the stored segment -> segment-change events.

The faust agent (``stream/app.py``) only groups records by partition, calls
:meth:`BatchProcessor.process` and sends what it returns. Everything here is testable without
Kafka: the store is the only I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from state.rfm import Record, recency_days
from state.store import RedisStore, SegmentWrite, StoredCustomer
from stream.changes import change_id, is_change
from stream.clustering import CustomerClusterer, features
from stream.events import Assignment, DeadLetter, SegmentChanged, encode_raw
from stream.metrics import Metrics
from stream.scoring import FixedThresholds, quintile_score, recency_bound_ms
from stream.segments import SegmentTable
from stream.validation import Accepted, InputRules, validate


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A Kafka record as consumed: where it came from and its raw bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class BatchResult:
    """What a batch produced: changes and dead letters to publish."""

    changes: list[SegmentChanged] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0


@dataclass(frozen=True, slots=True)
class Scored:
    """A customer scored at an as-of time."""

    recency_days: int
    r: int
    f: int
    m: int
    thresholds_version: str


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class BatchProcessor:
    """Processes one partition's batch at a time (one owner per partition, offset order).

    Parameters
    ----------
    store
        The Redis store of the namespace.
    rules
        Input validation rules.
    table
        The segment rule table.
    thresholds
        Fixed thresholds, used below ``min_population`` customers.
    clusterer
        The online clustering model (learns from every changed customer).
    metrics
        The metrics bundle.
    partitions
        Number of partitions of the input topic (the population spans all of them).
    min_population
        Below this many scored customers the fixed thresholds apply.
    currency_decimals
        Minor-unit digits of the reporting currency.
    """

    def __init__(self, store: RedisStore, rules: InputRules, table: SegmentTable,
                 thresholds: FixedThresholds, clusterer: CustomerClusterer, metrics: Metrics,
                 partitions: int, min_population: int = 100, currency_decimals: int = 2):
        self.store, self.rules, self.table = store, rules, table
        self.thresholds, self.clusterer, self.metrics = thresholds, clusterer, metrics
        self.partitions = list(range(partitions))
        self.min_population = min_population
        self.currency, self.decimals = rules.currency, currency_decimals

    async def process(self, partition: int, records: list[RawRecord],
                      now_ms: int | None = None) -> BatchResult:
        """Process one partition's records (ascending offsets).

        ``now_ms`` is the wall clock for the future-skew check and ``emitted_at`` (defaults to
        the real clock). Raises whatever Redis raises; then nothing of the batch was applied
        or only its state was (a redelivery completes it: the update is idempotent and the
        segment compare-and-set re-runs).
        """
        started = time.perf_counter()
        now = int(time.time() * 1000) if now_ms is None else now_ms
        result = BatchResult()
        state_records: list[Record] = []
        last_event: dict[str, tuple[str, str, int]] = {}
        for raw in records:
            verdict = validate(raw.key, raw.value, self.rules, now)
            if isinstance(verdict, Accepted):
                e = verdict.event
                state_records.append(Record(raw.offset, verdict.customer_id, e))
                last_event[verdict.customer_id] = (e.kind, e.event_id, e.occurred_ms)
            else:
                state_records.append(Record(raw.offset, None, None))
                result.dead_letters.append(self._dead_letter(raw, verdict.reason,
                                                             verdict.detail, now))
        self.metrics.events_consumed.inc(len(records))
        if not state_records:
            return result
        applied = await self.store.apply_batch(partition, state_records)
        # a redelivered record that was dead-lettered before is not dead-lettered again
        result.dead_letters = [d for d in result.dead_letters
                               if d.source_offset > applied.last_offset_before]
        for d in result.dead_letters:
            self.metrics.dead_lettered.labels(d.reason).inc()
        out = applied.outcome
        result.applied, result.duplicates = out.applied, out.duplicate_offsets + out.duplicate_events
        self.metrics.events_applied.inc(out.applied)
        self.metrics.duplicates_skipped.labels("offset").inc(out.duplicate_offsets)
        self.metrics.duplicates_skipped.labels("event_id").inc(out.duplicate_events)
        self.metrics.applied_offset.labels(str(partition)).set(records[-1].offset)

        scored_customers = [c for c in applied.customers.values() if c.state.has_purchased]
        if scored_customers:
            result.changes = await self._segment(partition, scored_customers, applied.changed,
                                                 applied.first_purchase, last_event, now)
        elapsed = time.perf_counter() - started
        self.metrics.batch_seconds.observe(elapsed)
        return result

    async def score(self, customers: list[StoredCustomer], as_of_ms: int) -> list[Scored]:
        """Score customers at ``as_of_ms`` against the current population (all partitions)."""
        days = [recency_days(c.state.last_purchase_ms or 0, as_of_ms) for c in customers]
        queries = [(recency_bound_ms(d, as_of_ms), c.state.frequency, c.state.monetary_minor)
                   for d, c in zip(days, customers, strict=True)]
        population, worse = await self.store.population_counts(self.partitions, queries)
        if population >= self.min_population:
            version = f"population:{population}"
            return [Scored(d, quintile_score(wr, population), quintile_score(wf, population),
                           quintile_score(wm, population), version)
                    for d, (wr, wf, wm) in zip(days, worse, strict=True)]
        t = self.thresholds
        return [Scored(d, t.r(d), t.f(c.state.frequency), t.m(c.state.monetary_minor), "fixed")
                for d, c in zip(days, customers, strict=True)]

    async def _segment(self, partition: int, customers: list[StoredCustomer],
                       changed: frozenset[str], first: frozenset[str],
                       last_event: dict[str, tuple[str, str, int]], now: int
                       ) -> list[SegmentChanged]:
        as_of = await self.store.watermark(self.partitions)
        assert as_of is not None, "a customer with a purchase implies a watermark"
        scored = await self.score(customers, as_of)
        feats = {}
        for c, s in zip(customers, scored, strict=True):
            feats[c.customer_id] = features(s.recency_days, c.state.frequency,
                                            c.state.monetary_minor / 10**self.decimals)
            if c.customer_id in changed:
                self.clusterer.learn_one(feats[c.customer_id], c.customer_id in first)
        writes: list[SegmentWrite] = []
        pending: list[tuple[StoredCustomer, Scored, Assignment | None, Assignment]] = []
        for c, s in zip(customers, scored, strict=True):
            seg = self.table.lookup(s.r, s.f, s.m)
            current = Assignment(segment=seg.name,
                                 cluster=self.clusterer.predict_one(feats[c.customer_id]))
            previous = (None if c.segment is None
                        else Assignment(segment=c.segment, cluster=c.cluster))
            if is_change(previous, current, c.customer_id in changed):
                writes.append(SegmentWrite(c.customer_id, c.segment, c.cluster, current.segment,
                                           current.cluster))
                pending.append((c, s, previous, current))
        if not writes:
            return []
        ok = await self.store.set_segments(partition, writes)
        changes = []
        for (c, s, previous, current), written in zip(pending, ok, strict=True):
            if not written:
                continue
            kind, event_id, occurred = last_event.get(c.customer_id, ("purchase", "", as_of))
            changes.append(SegmentChanged(
                change_id=change_id(c.customer_id, event_id, previous, current),
                customer_id=c.customer_id, previous=previous, current=current,
                recency_days=s.recency_days, frequency=c.state.frequency,
                monetary=Decimal(c.state.monetary_minor).scaleb(-self.decimals),
                currency=self.currency, r_score=s.r, f_score=s.f, m_score=s.m,
                strategy=self.table.segments[current.segment].strategy,
                cause="refund" if kind == "refund" else "purchase", cause_event_id=event_id or None,
                occurred_at=_utc(occurred), as_of=_utc(as_of), emitted_at=_utc(now),
                rules_version=self.table.version, thresholds_version=s.thresholds_version,
                model_version=self.clusterer.n_learned if current.cluster is not None else None,
            ))
            self.metrics.segment_changes.labels(previous.segment if previous else "",
                                                current.segment).inc()
        return changes

    def _dead_letter(self, raw: RawRecord, reason: str, detail: str, now: int) -> DeadLetter:
        key, key_enc = encode_raw(raw.key)
        value, value_enc = encode_raw(raw.value)
        return DeadLetter(reason=reason, detail=detail, source_topic=raw.topic,
                          source_partition=raw.partition, source_offset=raw.offset, key=key,
                          key_encoding=key_enc, value=value, value_encoding=value_enc,
                          dead_lettered_at=_utc(now))
