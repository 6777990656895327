"""The outbox publisher: segment changes and dead letters go from Redis to Kafka at least once.

A batch's segment changes and dead letters are written to its partition's outbox (a Redis
stream) in the same atomic script as the state and offset they follow from. The publisher sends
each change to ``segment-changes`` and to the compacted ``customer-segments`` (both keyed by
customer, so a new subscriber can bootstrap the present segment of every customer), each dead
letter to the dead-letter topic, each tombstone of an erased customer (``rfm-stream forget``)
as a null value to ``customer-segments``, waits for the broker's acknowledgements, and only
then deletes the entries. A crash or a broker outage in between re-sends them later: consumers de-duplicate
changes by the stable ``change_id``, dead letters by source partition and offset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from state.store import RedisStore

log = logging.getLogger(__name__)

# send(topic, [(key, value), ...]) -> an awaitable that completes when the broker acknowledged
# them all (stream.kafka_io.BatchSender.send)
Send = Callable[[str, list[tuple[bytes | None, bytes | None]]], Awaitable[Awaitable[Any]]]


class OutboxPublisher:
    """Drains the outboxes of the partitions this worker owns.

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
    """

    def __init__(self, store: RedisStore, send: Send, changes_topic: str, segments_topic: str,
                 dead_letter_topic: str, batch: int = 2000):
        self.store, self.send = store, send
        self.changes_topic, self.segments_topic = changes_topic, segments_topic
        self.dead_letter_topic = dead_letter_topic
        self.batch = batch
        self._lock = asyncio.Lock()
        self.published = 0

    async def drain(self, partitions: Iterable[int]) -> int:
        """Publish every pending entry of ``partitions``; returns how many were published.

        Raises whatever the producer or Redis raises; entries not acknowledged stay in the
        outbox for the next call.
        """
        total = 0
        async with self._lock:
            for p in sorted(set(partitions)):
                while True:
                    entries = await self.store.outbox_read(p, self.batch)
                    if not entries:
                        break
                    records: dict[str, list[tuple[bytes | None, bytes | None]]] = {
                        self.changes_topic: [], self.segments_topic: [],
                        self.dead_letter_topic: []}
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
                    acks = [await self.send(topic, recs) for topic, recs in records.items()
                            if recs]
                    await asyncio.gather(*acks)
                    await self.store.outbox_ack(p, [e[0] for e in entries])
                    total += len(entries)
                    if len(entries) < self.batch:
                        break
        self.published += total
        return total
