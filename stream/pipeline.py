"""One partition batch through the whole path: validate -> read state -> plan (RFM update,
score, segment, cluster, change) -> one atomic commit (state, offset, assignments, outbox).

The faust agent (``stream/app.py``) only groups records by partition, calls
:meth:`BatchProcessor.process` and publishes dead letters; segment changes leave through the
outbox (:mod:`stream.outbox`). Everything here is testable without Kafka: Redis is the only I/O.

Scoring thresholds are refreshed at deterministic points: when a partition's offsets enter a
new block of ``refresh_every`` offsets, from the population as it stands after the previous
block (all partitions). Batches are split at block boundaries, so a replay of one partition
scores every event with the same thresholds, whatever the batch sizes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from state.rfm import Record
from state.store import ConflictError, PartitionView, RedisStore
from stream.clustering import CustomerClusterer
from stream.events import DeadLetter, SegmentChanged, encode_raw
from stream.metrics import Metrics
from stream.planning import PlanContext, as_of, plan_batch
from stream.scoring import ScoringConfig, Thresholds, quintile_ranks
from stream.segments import SegmentTable
from stream.validation import Accepted, InputRules, Rejected, validate

log = logging.getLogger(__name__)

MAX_DEAD_LETTER_BYTES = 512 * 1024  # well under Kafka's default 1 MB record limit


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
    """What a batch produced: the changes committed to the outbox, and dead letters."""

    changes: list[SegmentChanged] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0


class GapError(RuntimeError):
    """Records start beyond Redis's last applied offset + 1: the ones between must be re-read.

    Happens when Redis lost its last writes (AOF everysec) while the consumer group had
    committed past them, or when the group's offsets are ahead of a fresh state namespace.
    """

    def __init__(self, partition: int, expected: int, got: int):
        super().__init__(f"partition {partition}: Redis applied up to offset {expected - 1}, "
                         f"but records start at {got}")
        self.partition, self.expected, self.got = partition, expected, got


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _blocks(records: list[Record], size: int) -> list[list[Record]]:
    out: list[list[Record]] = []
    for rec in records:
        if out and out[-1][-1].offset // size == rec.offset // size:
            out[-1].append(rec)
        else:
            out.append([rec])
    return out


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
    scoring
        How thresholds are made.
    clusterer
        The online clustering model (learns from every applied purchase).
    metrics
        The metrics bundle.
    partitions
        Number of partitions of the input topic (the population spans all of them).
    currency_decimals
        Minor-unit digits of the reporting currency.
    """

    def __init__(self, store: RedisStore, rules: InputRules, table: SegmentTable,
                 scoring: ScoringConfig, clusterer: CustomerClusterer, metrics: Metrics,
                 partitions: int, currency_decimals: int = 2):
        self.store, self.rules, self.table = store, rules, table
        self.scoring, self.clusterer, self.metrics = scoring, clusterer, metrics
        self.partitions = list(range(partitions))
        self.decimals = currency_decimals
        self._fixed = Thresholds.fixed(scoring.fixed)

    async def process(self, partition: int, records: list[RawRecord],
                      now_ms: int | None = None, check_gap: bool = True,
                      reject: dict[int, tuple[str, str]] | None = None) -> BatchResult:
        """Process one partition's records (ascending offsets).

        ``now_ms`` is the wall clock for the future-skew check and ``emitted_at`` (defaults to
        the real clock). ``reject`` forces records (by offset) to be dead letters with the
        given ``(reason, detail)`` (used for a record whose processing failed).

        Raises
        ------
        GapError
            With ``check_gap``, when the first record is beyond the applied offset + 1; nothing
            was written. Re-read the missing range, process it, then these records with
            ``check_gap=False`` (holes left then are offsets that hold no record).
        redis.exceptions.RedisError
            Nothing of the failed block was written (a redelivery applies it).
        """
        if not records:
            return BatchResult()
        started = time.perf_counter()
        now = int(time.time() * 1000) if now_ms is None else now_ms
        result = BatchResult()
        state_records: list[Record] = []
        dead: dict[int, DeadLetter] = {}
        for raw in records:
            verdict = (Rejected(*reject[raw.offset]) if reject and raw.offset in reject
                       else validate(raw.key, raw.value, self.rules, now))
            if isinstance(verdict, Accepted):
                state_records.append(Record(raw.offset, verdict.customer_id, verdict.event))
            else:
                state_records.append(Record(raw.offset, None, None))
                dead[raw.offset] = self.dead_letter(raw, verdict.reason, verdict.detail, now)
        self.metrics.events_consumed.inc(len(records))
        previous_last: int | None = None
        for block in _blocks(state_records, self.scoring.refresh_every):
            await self._process_block(partition, block, dead, now, result, check_gap,
                                      previous_last)
            previous_last = block[-1].offset
        self.metrics.applied_offset.labels(str(partition)).set(records[-1].offset)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return result

    async def _process_block(self, partition: int, block: list[Record],
                             dead: dict[int, DeadLetter], now: int, result: BatchResult,
                             check_gap: bool, previous_last: int | None) -> None:
        """Read, plan and commit one block (its dead letters go to the outbox with it).

        ``previous_last``: the last offset of the block committed just before in this batch;
        Redis must hold at least that (else it lost writes in between: GapError).
        """
        ids = [r.customer_id for r in block if r.customer_id is not None]
        for attempt in range(5):
            view = await self.store.read_partition(partition, ids, self.partitions)
            if previous_last is not None and view.last_offset < previous_last:
                raise GapError(partition, view.last_offset + 1, block[0].offset)
            if (check_gap and previous_last is None
                    and block[0].offset > view.last_offset + 1):
                raise GapError(partition, view.last_offset + 1, block[0].offset)
            thresholds = await self._thresholds_for(view, block[0].offset)
            model = copy.deepcopy(self.clusterer)
            ctx = PlanContext(self.table, thresholds, model, self.store.limits,
                              self.rules.currency, self.decimals, now)
            plan = plan_batch(view, block, ctx)
            # a redelivered record was dead-lettered when it was first applied
            letters = [dead[r.offset] for r in block
                       if r.offset in dead and r.offset > view.last_offset]
            outbox = ([("c", c.model_dump_json()) for c in plan.changes]
                      + [("d", d.model_dump_json()) for d in letters])
            try:
                outcome = await self.store.commit_batch(
                    partition, view.last_offset, block, plan.assignments, outbox)
            except ConflictError as exc:
                log.warning("%s (attempt %d): another writer; re-reading", exc, attempt + 1)
                continue
            self.clusterer = model
            result.changes += plan.changes
            result.dead_letters += letters
            result.applied += outcome.applied
            result.duplicates += outcome.duplicate_offsets + outcome.duplicate_events
            self.metrics.events_applied.inc(outcome.applied)
            self.metrics.duplicates_skipped.labels("offset").inc(outcome.duplicate_offsets)
            self.metrics.duplicates_skipped.labels("event_id").inc(outcome.duplicate_events)
            for c in plan.changes:
                self.metrics.segment_changes.labels(
                    c.previous.segment if c.previous else "", c.current.segment).inc()
            for d in letters:
                self.metrics.dead_lettered.labels(d.reason).inc()
            return
        raise ConflictError(partition, view.last_offset, -1)

    async def _thresholds_for(self, view: PartitionView, first_offset: int) -> Thresholds:
        """The thresholds of the block starting at ``first_offset``; refreshed (and stored)
        when the block is newer than the partition's current thresholds."""
        if self.scoring.mode == "fixed":
            return self._fixed
        block = first_offset // self.scoring.refresh_every
        if view.thresholds:
            stored = json.loads(view.thresholds)
            if int(stored["block"]) >= block:
                return Thresholds.from_dict(stored)
        fresh = await self.refresh_thresholds(view)
        text = json.dumps({**fresh.to_dict(), "block": block})
        await self.store.save_thresholds(view.partition, view.last_offset, text)
        return fresh

    async def refresh_thresholds(self, view: PartitionView) -> Thresholds:
        """Thresholds from the current population of all partitions, at the watermark."""
        n = await self.store.population(self.partitions)
        if n < self.scoring.min_population or view.watermark is None:
            return self._fixed
        t = as_of(view.watermark, view.other_watermarks)
        stats = await self.store.order_statistics(self.partitions, t, quintile_ranks(n))
        return Thresholds.from_order_statistics(
            n, stats.recency_kth_largest, stats.frequency_kth_smallest,
            stats.monetary_kth_smallest, version=f"q{n}@{_utc(t).isoformat()}")

    async def current_thresholds(self, partition: int) -> Thresholds:
        """The thresholds a partition scores with now (for views and exports)."""
        if self.scoring.mode == "fixed":
            return self._fixed
        text = await self.store.thresholds(partition)
        return Thresholds.from_dict(json.loads(text)) if text else self._fixed

    def dead_letter(self, raw: RawRecord, reason: str, detail: str, now: int) -> DeadLetter:
        """The dead letter of a record, made to fit in a Kafka record: a key or value over
        ``max_message_bytes`` keeps only its head (the detail gives its size and SHA-256), and
        the heads shrink until the JSON is under :data:`MAX_DEAD_LETTER_BYTES`."""
        detail = detail[:1000]
        limit = min(self.rules.max_message_bytes, MAX_DEAD_LETTER_BYTES // 8)
        while True:
            notes, parts = [], {}
            for name, data in (("key", raw.key), ("value", raw.value)):
                if data is not None and len(data) > limit:
                    notes.append(f"{name} truncated to {limit} of {len(data)} bytes, sha256 "
                                 f"{hashlib.sha256(data).hexdigest()}")
                    data = data[:limit]
                parts[name] = encode_raw(data)
            letter = DeadLetter(
                reason=reason, detail=detail + (f" ({'; '.join(notes)})" if notes else ""),
                source_topic=raw.topic, source_partition=raw.partition,
                source_offset=raw.offset, key=parts["key"][0], key_encoding=parts["key"][1],
                value=parts["value"][0], value_encoding=parts["value"][1],
                value_truncated=bool(notes), dead_lettered_at=_utc(now))
            if len(letter.model_dump_json()) <= MAX_DEAD_LETTER_BYTES or limit <= 64:
                return letter
            limit //= 4
