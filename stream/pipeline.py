"""One partition batch through the whole path: validate -> read state -> plan (RFM update,
score, segment, cluster, change) -> one atomic commit (state, offset, assignments, outbox).

The worker's batch handler (``stream/app.py``) only groups records by partition and calls
:meth:`BatchProcessor.process`; segment changes and dead letters leave through the outbox
(:mod:`stream.outbox`). Everything here is testable without Kafka: Redis is the only I/O.

Scoring thresholds are refreshed at deterministic points: when a partition's offsets enter a
new block of ``refresh_every`` offsets, from the population as it stands after the previous
block (all partitions). Batches are split at block boundaries, so a replay of one partition
scores every event with the same thresholds, whatever the batch sizes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from state.rfm import Limits, Record
from state.store import ConflictError, OrderStatistics, PartitionView, RedisStore, StoredCustomer
from stream.changes import Change
from stream.clustering import ClusterModel
from stream.events import DeadLetter, encode_raw
from stream.metrics import Metrics
from stream.planning import Plan, PlanContext, plan_step
from stream.scoring import ScoringConfig, Thresholds, quintile_ranks
from stream.segments import SegmentTable
from stream.timeline import TimePolicy, iso, utc
from stream.trainer import TRAINER_PARTITION, TrainerConfig, dumps, sample_ranks, train
from stream.validation import Accepted, InputRules, Rejected, validate

log = logging.getLogger(__name__)

MAX_DEAD_LETTER_BYTES = 512 * 1024  # well under Kafka's default 1 MB record limit


class RawRecord(NamedTuple):
    """A Kafka record as consumed: where it came from and its raw bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class BatchResult:
    """What a batch produced: the changes committed to the outbox, and dead letters."""

    changes: list[Change] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0


def recorded_rules(text: str | None) -> tuple[str | None, int | None]:
    """A partition's meta field ``rules``, ``"<SegmentTable.rules_digest> <commit sequence it
    was recorded at>"``, as ``(digest, sequence)``; None for what is absent or unreadable
    (a value written by hand must not stop the partition: a breaker's ``"<digest> --5"``
    raised at every step).

    >>> recorded_rules("36cbdaaf00fe21be 3"), recorded_rules("36cbdaaf00fe21be --5")
    (('36cbdaaf00fe21be', 3), ('36cbdaaf00fe21be', None))
    >>> recorded_rules(None), recorded_rules("garbage")
    ((None, None), ('garbage', None))
    """
    digest, _, since = (text or "").partition(" ")
    ok = re.fullmatch(r"-?[0-9]{1,19}", since, flags=re.ASCII) is not None
    return digest or None, int(since) if ok else None


class GapError(RuntimeError):
    """Records start beyond Redis's last applied offset + 1: the ones between must be re-read.

    Happens when Redis lost its last writes (AOF everysec) while the consumer group had
    committed past them, or when the group's offsets are ahead of a fresh state namespace.
    """

    def __init__(self, partition: int, expected: int, got: int):
        super().__init__(f"partition {partition}: Redis applied up to offset {expected - 1}, "
                         f"but records start at {got}")
        self.partition, self.expected, self.got = partition, expected, got


def _blocks(records: list[Record], size: int) -> list[list[Record]]:
    out: list[list[Record]] = []
    for rec in records:
        if out and out[-1][-1].offset // size == rec.offset // size:
            out[-1].append(rec)
        else:
            out.append([rec])
    return out


class BatchProcessor:
    """Processes one partition's steps at a time (one owner per partition, offset order).

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
    metrics
        The metrics bundle.
    partitions
        Number of partitions of the input topic (the population spans all of them).
    currency_decimals
        Minor-unit digits of the reporting currency.
    limits, policy
        Memory bounds per customer; how time moves scores (watermark, idleness, flapping
        guard, rescore rate, window).
    trainer
        The clustering model's parameters (trained when this worker owns partition 0).
    replay
        Mark the segment changes as a replay's.
    max_due
        At most this many due customers are read per step.

    Attributes
    ----------
    outbox
        Write each step's segment changes and dead letters to the partition's outbox (True).
        A replay that publishes its changes nowhere sets it False: it still counts them in
        the :class:`BatchResult`, and skips serialising them and writing them to Redis.
    """

    def __init__(self, store: RedisStore, rules: InputRules, table: SegmentTable,
                 scoring: ScoringConfig, metrics: Metrics,
                 partitions: int, currency_decimals: int = 2, limits: Limits = Limits(),
                 policy: TimePolicy = TimePolicy(), max_due: int = 10_000,
                 trainer: TrainerConfig = TrainerConfig(), replay: bool = False):
        if store.population_layout == "chunked" and policy.window is not None:
            raise ValueError("the chunked population layout keeps no window (see "
                             "RedisStore's population_layout)")
        self.store, self.rules, self.table = store, rules, table
        self.scoring, self.metrics = scoring, metrics
        self.model: ClusterModel | None = None  # the latest published snapshot
        self.partitions = list(range(partitions))
        self.decimals, self.limits, self.policy = currency_decimals, limits, policy
        self.max_due, self.trainer, self.replay = max_due, trainer, replay
        self.outbox = True
        self._fixed = Thresholds.fixed(scoring.fixed)
        self._last_stats: OrderStatistics | None = None  # warm-starts the next refresh's search
        # one step of a partition at a time (the agent's and the sweep timer's); steps of
        # different partitions may interleave: one plans while another waits for Redis
        self._locks: dict[int, asyncio.Lock] = {}
        # partition -> the commit sequence at which this processor made its customers due for
        # its rule table (the next commit records the table; a sequence moved on without it,
        # e.g. another worker's table recorded since, schedules them again)
        self._rules_scheduled: dict[int, int] = {}
        self._layout_checked = False

    async def process(self, partition: int, records: list[RawRecord],
                      now_ms: int | None = None, check_gap: bool = True,
                      reject: dict[int, tuple[str, str]] | None = None,
                      skip: set[int] | None = None,
                      reject_customers: Mapping[str, tuple[str, str]] | None = None
                      ) -> BatchResult:
        """Process one partition's records (ascending offsets).

        ``now_ms`` is the wall clock for the future-skew check, idleness and ``emitted_at``
        (defaults to the real clock: read once for the records' checks, and again by each
        step once it holds the partition, so a step that waited for a sweep or retried after
        a conflict stamps when it ran). ``reject`` forces records (by offset) to be dead letters
        with the given ``(reason, detail)`` (used for a record whose processing failed), and
        ``reject_customers`` the valid records of those customers (whose stored values are
        unreadable: ``state.store.UnreadableCustomers``); ``skip`` offsets only advance the
        applied offset (a replay from an event time).

        Raises
        ------
        GapError
            With ``check_gap``, when the first record is beyond the applied offset + 1; nothing
            was written. Re-read the missing range, process it, then these records with
            ``check_gap=False`` (holes left then are offsets that hold no record).
        redis.exceptions.RedisError
            Nothing of the failed step was written (a redelivery applies it).
        """
        if not records:
            return BatchResult()
        started = time.perf_counter()
        now = int(time.time() * 1000) if now_ms is None else now_ms
        result = BatchResult()
        state_records: list[Record] = []
        dead: dict[int, DeadLetter] = {}
        for raw in records:
            if skip and raw.offset in skip:
                state_records.append(Record(raw.offset, None, None))
                continue
            verdict = (Rejected(*reject[raw.offset]) if reject and raw.offset in reject
                       else validate(raw.key, raw.value, self.rules, now))
            if reject_customers and isinstance(verdict, Accepted) \
                    and verdict.customer_id in reject_customers:
                verdict = Rejected(*reject_customers[verdict.customer_id])
            if isinstance(verdict, Accepted):
                state_records.append(Record(raw.offset, verdict.customer_id, verdict.event))
                self.metrics.event_time_lag.observe(max(0, now - verdict.event.occurred_ms) / 1000)
            else:
                state_records.append(Record(raw.offset, None, None))
                dead[raw.offset] = self.dead_letter(raw, verdict.reason, verdict.detail, now)
        self.metrics.events_consumed.inc(len(records))
        async with self._locks.setdefault(partition, asyncio.Lock()):
            previous_last: int | None = None
            for block in _blocks(state_records, self.scoring.refresh_every):
                await self._run(partition, block, dead, now_ms, result, check_gap,
                                previous_last)
                previous_last = block[-1].offset
        self.metrics.applied_offset.labels(str(partition)).set(records[-1].offset)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return result

    async def sweep(self, partition: int, now_ms: int | None = None) -> BatchResult:
        """Re-score the partition's customers that are due by its as-of time now (no new
        event of its own: the watermark moved on other partitions, or the wall clock moved)."""
        result = BatchResult()
        async with self._locks.setdefault(partition, asyncio.Lock()):
            await self._run(partition, [], {}, now_ms, result, False, None)
        return result

    async def _run(self, partition: int, block: list[Record], dead: dict[int, DeadLetter],
                   now_ms: int | None, result: BatchResult, check_gap: bool,
                   previous_last: int | None) -> None:
        """Plan and commit ``block`` (records of one threshold block, or none: a sweep) in as
        many steps as the due customers need. Dead letters go to the outbox with their step.
        Each step reads the wall clock (``now_ms``: a fixed one) for ``emitted_at``, idleness
        and ``seen`` when it starts, holding the partition's lock: a breaker found changes
        stamped seconds before they were made, a customer's later change before its earlier
        one, when the batch's time was taken before waiting for the lock.

        ``previous_last``: the last offset of the block committed just before in this batch;
        Redis must hold at least that (else it lost writes in between: GapError).
        """
        if not self._layout_checked:  # ValueError: the namespace has the other layout
            await self.store.check_layout(self.partitions)
            self._layout_checked = True
        remaining, conflicts = block, 0
        while True:
            now = int(time.time() * 1000) if now_ms is None else now_ms
            hint = max((r.event.occurred_ms for r in remaining if r.event is not None),
                       default=None)
            if not block:
                hint = await self._sweep_as_of(partition, now)
                if hint is None:
                    return
            elif self.policy.mode == "wall_clock":
                hint = now
            ids = [r.customer_id for r in remaining if r.customer_id is not None]
            with self.metrics.redis_seconds.labels("read").time():
                view = await self.store.read_partition(partition, ids, self.partitions, hint,
                                                       self.max_due)
            if remaining:
                if previous_last is not None and view.last_offset < previous_last:
                    raise GapError(partition, view.last_offset + 1, remaining[0].offset)
                if (check_gap and previous_last is None and remaining is block
                        and block[0].offset > view.last_offset + 1):
                    raise GapError(partition, view.last_offset + 1, block[0].offset)
            # the rule table: another one recorded re-scores everyone; none recorded (a new
            # namespace, or one a release before this one wrote) is recorded without that
            rules = self.table.rules_digest
            recorded, since = recorded_rules(view.rules)
            if (view.rules is not None and recorded != rules
                    and self._rules_scheduled.get(partition) != view.seq):
                await self._rescore_all(view)
                continue  # re-read: its due customers changed
            record = recorded != rules or since is None  # (again, if written by hand)
            generation = since if since is not None and not record else view.seq
            # thresholds are refreshed (and the model trained) only by steps with records, at
            # offset blocks: never by a timer sweep, whose timing would shape the output
            first = remaining[0].offset if remaining else -1
            read: dict[str, StoredCustomer | None] = {}  # customers a refresh read
            thresholds, text, rescore = await self._thresholds_for(view, first, now, read)
            if rescore:
                missing = [c for c in rescore if c not in view.customers and c not in read]
                extra = await self.store.read_customers(partition, missing, others=True)
                known = {c: read[c] for c in rescore if c in read}
                view = replace(view, customers={**known, **extra, **view.customers})
            await self._refresh_model(view.model_version)
            trained = (await self._train_for(view, first, now)
                       if partition == TRAINER_PARTITION and remaining else None)
            model = ClusterModel.from_snapshot(json.loads(trained[1])) if trained else self.model
            ctx = PlanContext(self.table, thresholds, model, self.limits,
                              self.rules.currency, self.decimals, now, self.policy, self.replay,
                              generation)
            own_active = bool(remaining) or self.policy.active(view.seen_ms, now)
            plan = plan_step(view, remaining, ctx, rescore, own_active)
            consumed = remaining[:plan.consumed]
            # a redelivered record was dead-lettered when it was first applied
            letters = [dead[r.offset] for r in consumed
                       if r.offset in dead and r.offset > view.last_offset]
            if not (consumed or plan.writes or plan.changes or text
                    or plan.as_of != view.as_of or record):
                return
            meta: dict[str, str | int] = {}
            if plan.last_offset > view.last_offset:
                meta["offset"] = plan.last_offset
            if plan.watermark is not None:
                meta["wm"] = plan.watermark
            if plan.as_of is not None:
                meta["asof"] = plan.as_of
            if plan.applied_any:
                meta["seen"] = now
            if text is not None:
                meta["thr"] = text
            if record:
                meta["rules"] = f"{rules} {generation}"
            outbox = ([("c", c.to_json(), c.customer_id) for c in plan.changes]
                      + [("d", d.model_dump_json(),
                          d.key if d.key_encoding == "utf-8" else None) for d in letters]
                      ) if self.outbox else []
            try:
                with self.metrics.redis_seconds.labels("commit").time():
                    await self.store.commit(partition, view.seq, meta, plan.writes, outbox,
                                            trained)
            except ConflictError as exc:
                conflicts += 1
                if conflicts >= 5:
                    raise
                log.warning("%s (attempt %d): another writer; re-reading", exc, conflicts)
                continue
            self.model = model
            if plan.as_of is not None:
                self.metrics.as_of_seconds.labels(str(partition)).set(plan.as_of / 1000)
                if model is not None and model.as_of_ms is not None:
                    self.metrics.model_version.set(model.version)
                    self.metrics.model_age.set(max(0, plan.as_of - model.as_of_ms) / 1000)
            self._account(plan, letters, result)
            # redelivered records that were dead letters are skipped by offset too
            redelivered = sum(1 for r in consumed if r.offset in dead and r.offset <= view.last_offset)
            self.metrics.duplicates_skipped.labels("offset").inc(redelivered)
            result.duplicates += redelivered
            remaining = remaining[plan.consumed:]
            if not remaining and not plan.more:
                return

    async def _train_for(self, view: PartitionView, first_offset: int, now: int
                         ) -> tuple[int, str] | None:
        """A training step when the trainer partition enters a new block (the block's first
        step, whatever the batch sizes): ``(version, snapshot JSON)`` to commit with it, else
        None (see :mod:`stream.trainer`)."""
        block = first_offset // self.scoring.refresh_every
        if view.last_offset >= block * self.scoring.refresh_every:
            return None  # not the block's first step: training is decided there only
        text = await self.store.load_model()
        previous = json.loads(text) if text else None
        if previous is not None and int(previous.get("block", -1)) >= block:
            return None
        population = await self.store.population(self.partitions)
        as_of = self.policy.as_of(view.as_of, view.watermark, view.others, now)
        if not population or as_of is None:
            return None
        version = (int(previous["version"]) if previous else 0) + 1
        ranks = sample_ranks(version, self.trainer.seed, population, self.trainer.sample_size)
        with self.metrics.redis_seconds.labels("train").time():
            sample = await self.store.sample_by_rank(self.partitions, ranks)
        snapshot = train(previous, self.trainer, sample, as_of, population, self.decimals)
        snapshot["block"] = block
        return version, dumps(snapshot)

    async def _refresh_model(self, version: int | None) -> None:
        """Load the latest model snapshot when its version differs from the one held."""
        if version == (self.model.version if self.model else None):
            return
        text = await self.store.load_model()
        self.model = ClusterModel.from_snapshot(json.loads(text)) if text else None

    def _account(self, plan: Plan, letters: list[DeadLetter], result: BatchResult) -> None:
        outcome = plan.outcome
        result.changes += plan.changes
        result.dead_letters += letters
        result.applied += outcome.applied
        result.duplicates += outcome.duplicate_offsets + outcome.duplicate_events
        self.metrics.events_applied.inc(outcome.applied)
        self.metrics.duplicates_skipped.labels("offset").inc(outcome.duplicate_offsets)
        self.metrics.duplicates_skipped.labels("event_id").inc(outcome.duplicate_events)
        entries = Counter((c.current.segment, c.cause) for c in plan.changes)
        exits = Counter((c.previous.segment, c.cause) for c in plan.changes
                        if c.previous is not None)
        for labels, n in entries.items():
            self.metrics.segment_entries.labels(*labels).inc(n)
        for labels, n in exits.items():
            self.metrics.segment_exits.labels(*labels).inc(n)
        for d in letters:
            self.metrics.dead_lettered.labels(d.reason).inc()

    async def _rescore_all(self, view: PartitionView) -> None:
        """A segment rule table other than the one the partition's stored segments were
        assigned under (``rules_digest``): every scored customer becomes due at the
        partition's as-of time, so the steps that follow re-score them all (``cause =
        rescore``; a change only where the segment differs), at most ``max_due`` per step.
        The table is recorded in the partition's meta by the next commit."""
        n = 0 if view.as_of is None else await self.store.due_all(view.partition, view.as_of)
        self._rules_scheduled[view.partition] = view.seq  # once all are due (else: again)
        log.warning("partition %d: the segment rule table changed (%s -> %s): %d customers "
                    "will be re-scored", view.partition, view.rules, self.table.rules_digest, n)

    async def _sweep_as_of(self, partition: int, now: int) -> int | None:
        """The as-of time a sweep of ``partition`` can reach now (None: nothing moved)."""
        if self.policy.mode == "wall_clock":
            return now
        clocks = await self.store.clocks(self.partitions)
        own = next(c for c in clocks if c.partition == partition)
        others = [c for c in clocks if c.partition != partition]
        return self.policy.watermark(own.watermark, others, now,
                                     own_active=self.policy.active(own.seen_ms, now))

    async def _thresholds_for(self, view: PartitionView, first_offset: int, now: int,
                              read: dict[str, StoredCustomer | None] | None = None
                              ) -> tuple[Thresholds, str | None, list[str]]:
        """The thresholds of the block starting at ``first_offset`` (-1: a sweep, which uses
        the current ones): ``(thresholds, JSON to store or None, customers to re-score)``;
        ``read`` gets the customers read on the way (see ``population_between``).
        Refreshed when the block is newer than the partition's current thresholds; the
        customers a refresh may move are re-scored."""
        if self.scoring.mode == "fixed":
            return self._fixed, None, []
        block = first_offset // self.scoring.refresh_every
        old = None
        if view.thresholds:
            stored = json.loads(view.thresholds)
            old = Thresholds.from_dict(stored)
            if int(stored["block"]) >= block or first_offset < 0:
                return old, None, []
        if first_offset < 0:  # a sweep before any refresh
            return self._fixed, None, []
        fresh = await self.refresh_thresholds(view, now)
        text = json.dumps({**fresh.to_dict(), "block": block})
        if fresh == (old or self._fixed):  # no stored thresholds: the fixed ones scored
            return fresh, text, []
        return fresh, text, await self._moved_by(view.partition, old, fresh, read)

    async def _moved_by(self, partition: int, old: Thresholds | None, new: Thresholds,
                        read: dict[str, StoredCustomer | None] | None = None) -> list[str]:
        """Customers of a partition whose segment differs between ``old`` and ``new``
        thresholds (all of them when either side is not quintiles: a population that fell
        below the minimum goes back to the fixed thresholds). Only the customers whose
        R, F or M score differs are read (:meth:`Thresholds.moved_ranges`), so the cost grows
        with the customers a refresh moves, not with the population."""
        ranges = ([("last", float("-inf"), float("inf"))] if old is None
                  else old.moved_ranges(new))
        if not ranges:
            return []
        ids, values = await self.store.population_between(partition, ranges, read)
        if old is None or old.anchor_ms is None or new.anchor_ms is None or not ids:
            return sorted(ids)
        last, f, m = values[:, 0], values[:, 1], values[:, 2]
        before = self.table.lookup_many(old.score_many(last, 0, f, m))
        after = self.table.lookup_many(new.score_many(last, 0, f, m))
        return sorted(c for c, moved in zip(ids, (before != after).tolist(), strict=True)
                      if moved)

    async def refresh_thresholds(self, view: PartitionView, now: int) -> Thresholds:
        """Thresholds from the current population of all partitions, anchored at the
        partition's as-of time."""
        t = self.policy.as_of(view.as_of, view.watermark, view.others, now)
        if t is None:
            return self._fixed
        least = self.scoring.min_population
        with self.metrics.redis_seconds.labels("population").time():
            stats = await self.store.order_statistics(
                self.partitions, t, lambda n: quintile_ranks(n) if n >= least else (),
                hint=self._last_stats)
        n = stats.population
        if n < least:
            return self._fixed
        self._last_stats = stats
        return Thresholds.from_order_statistics(
            n, stats.recency_kth_largest, stats.frequency_kth_smallest,
            stats.monetary_kth_smallest,
            version=f"q{n}@{iso(t)}", anchor_ms=t)

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
                value_truncated=bool(notes), dead_lettered_at=utc(now))
            if len(letter.model_dump_json()) <= MAX_DEAD_LETTER_BYTES or limit <= 64:
                return letter
            limit //= 4
