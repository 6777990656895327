"""How the worker gets one partition's records applied (:class:`PartitionRunner`): retries
what is retryable, re-reads a gap from the topic first, and isolates a record whose
processing fails as a ``processing_error`` dead letter."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from state.store import ConflictError, LayoutError, UnreadableCustomers
from stream.pipeline import BatchResult, GapError, RawRecord
from stream.services import Services

log = logging.getLogger("rfm_stream")

# retried as they are, never dead-lettered: the record is fine, its step could not commit
# (Redis or Kafka unreachable, or another writer of the partition during a rebalance)
RETRYABLE = (RedisError, OSError, KafkaError, ConflictError)
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
                except (*RETRYABLE, LayoutError):  # a layout error is no record's fault
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
