"""The outbox publisher: segment changes and dead letters go from Redis to Kafka at least once.

A batch's segment changes and dead letters are written to its partition's outbox (a Redis
stream) in the same atomic script as the state and offset they follow from. The publisher sends
each change to ``segment-changes`` and to the compacted ``customer-segments`` (both keyed by
customer, so a new subscriber can bootstrap the present segment of every customer), each dead
letter to the dead-letter topic, each tombstone of an erased customer (``rfm-stream forget``)
as a null value to ``customer-segments``, waits for the broker's acknowledgements, and only
then deletes the entries. A crash or a broker outage in between re-sends them later: consumers de-duplicate
changes by the stable ``change_id``, dead letters by source partition and offset. Only the
partition's owner publishes its outbox (see :class:`OutboxPublisher` for how a rebalance hands
it over).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from state.store import FencedError, RedisStore

log = logging.getLogger(__name__)

# send(topic, [(key, value), ...]) -> an awaitable that completes when the broker acknowledged
# them all (stream.kafka_io.BatchSender.send)
Send = Callable[[str, list[tuple[bytes | None, bytes | None]]], Awaitable[Awaitable[Any]]]


@dataclass
class _Claim:
    """This worker's hold on one partition's outbox: its token, and whether it is stored in
    Redis yet (a claim that failed is made again by the next drain, before any read)."""

    token: str
    stored: bool = False


class OutboxPublisher:
    """Drains the outboxes of the partitions this worker owns.

    Only partitions given to :meth:`assign` and not since given to :meth:`revoke` are
    drained. Two rules keep an old owner from re-sending, after the new owner published a
    newer value (or a tombstone) to the compacted topic, an older change it read before a
    rebalance:

    - :meth:`revoke` (the consumer's partitions are being revoked) stops every drain of those
      partitions and returns only once the publication in flight is acknowledged (or failed):
      faust's revocation waits for it, so the worker rejoins the group, and the partitions
      reach their next owner, only after everything it read from those outboxes is on the
      broker;
    - each owner claims the outboxes of its partitions in Redis on :meth:`assign` (a fresh
      token in the partition's meta); the outbox is read and acknowledged only with the
      holding token. A worker that lost a partition without having been told yet (its event
      loop stalled past the rebalance, or the group moved on without it) reads nothing from
      the moment the new owner claimed it, and leaves the entries it had in flight to it.

    What is left is a zombie's batch read before the new owner's claim and still travelling to
    the broker after the new owner sent a newer entry of the same customer: only Kafka's
    producer fencing (transactions) can stop that, which the local broker does not support.

    Parameters
    ----------
    store
        The Redis store.
    send
        Produces records to a topic, in order, and returns an awaitable of their
        acknowledgement.
    changes_topic, segments_topic, dead_letter_topic
        ``segment-changes``, the compacted ``customer-segments`` and ``purchases-dlq``.
    batch
        Entries read per partition and round.
    on_fenced
        Called with a partition another publisher claimed (it is no longer drained here).
    """

    def __init__(self, store: RedisStore, send: Send, changes_topic: str, segments_topic: str,
                 dead_letter_topic: str, batch: int = 2000,
                 on_fenced: Callable[[int], None] | None = None):
        self.store, self.send = store, send
        self.on_fenced = on_fenced
        self.changes_topic, self.segments_topic = changes_topic, segments_topic
        self.dead_letter_topic = dead_letter_topic
        self.batch = batch
        # per partition: held while a drain reads, sends or acknowledges its entries (or an
        # assignment claims it); a revocation waits only for its own partitions' (a relay
        # draining a large backlog of another partition held rebalances until killed)
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._owned: dict[int, _Claim] = {}
        self.published = 0

    @property
    def owned(self) -> set[int]:
        """The partitions whose outboxes this publisher drains."""
        return set(self._owned)

    async def assign(self, partitions: Iterable[int]) -> None:
        """Start draining ``partitions`` (newly assigned): each gets a fresh token, claimed in
        Redis now (after the drain in flight, if any), which fences out any earlier
        publisher of it. A claim that fails (Redis unreachable) is logged and made by the
        next drain of the partition before it reads anything."""
        claims = {p: _Claim(secrets.token_hex(8)) for p in sorted(set(partitions))}
        self._owned.update(claims)
        for p, claim in claims.items():
            async with self._locks[p]:
                if self._owned.get(p) is not claim:
                    continue  # revoked (or assigned again) meanwhile
                try:
                    await self.store.outbox_claim(p, claim.token)
                except (RedisError, OSError) as exc:
                    log.warning("outboxes of partitions %s not claimed yet (%r); their next "
                                "drain claims them", sorted(c for c in claims
                                                           if not claims[c].stored), exc)
                    return
                claim.stored = True

    async def revoke(self, partitions: Iterable[int]) -> None:
        """Stop draining ``partitions``: no drain reads them from now on, and this returns
        only once the batches of them in flight (if any) are done, so every entry read from
        them is acknowledged by the broker (or its send failed) by then; a drain of other
        partitions goes on. Waits as long as those batches do (a broker that does not answer
        holds them, as it holds faust's own producer flush on revocation)."""
        ps = set(partitions)
        for p in ps:
            self._owned.pop(p, None)
        for p in sorted(ps):
            async with self._locks[p]:
                pass

    async def drain(self, partitions: Iterable[int]) -> int:
        """Publish every pending entry of ``partitions`` that this publisher owns (others
        are skipped); returns how many were published and deleted.

        A partition claimed by another publisher meanwhile (FencedError) is dropped from the
        owned ones with a warning. Raises whatever else the producer or Redis raises; entries
        not acknowledged stay in the outbox for the next call.
        """
        total = 0
        for p in sorted(set(partitions)):
            async with self._locks[p]:
                total += await self._drain_partition(p)
        self.published += total
        return total

    async def _drain_partition(self, p: int) -> int:
        total = 0
        while True:
            claim = self._owned.get(p)
            if claim is None:  # never assigned, or revoked (maybe while its batch was out)
                return total
            try:
                if not claim.stored:
                    await self.store.outbox_claim(p, claim.token)
                    claim.stored = True
                entries = await self.store.outbox_read(p, self.batch, publisher=claim.token)
                if not entries:
                    return total
                records: dict[str, list[tuple[bytes | None, bytes | None]]] = {
                    self.changes_topic: [], self.segments_topic: [], self.dead_letter_topic: []}
                for _, kind, value, text_key in entries:
                    key = None if text_key is None else text_key.encode()
                    if kind == "t":  # an erased customer: null value on the compacted topic
                        records[self.segments_topic].append((key, None))
                    elif kind == "d":
                        records[self.dead_letter_topic].append((key, value.encode()))
                    else:
                        data = value.encode()
                        records[self.changes_topic].append((key, data))
                        records[self.segments_topic].append((key, data))
                acks = [await self.send(topic, recs) for topic, recs in records.items() if recs]
                await asyncio.gather(*acks)
                await self.store.outbox_ack(p, [e[0] for e in entries], publisher=claim.token)
            except FencedError as exc:
                log.warning("%s: no longer publishing it (its new owner does)", exc)
                if self._owned.get(p) is claim:
                    del self._owned[p]
                    if self.on_fenced is not None:
                        self.on_fenced(p)
                return total
            total += len(entries)
            if len(entries) < self.batch:
                return total
