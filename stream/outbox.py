"""The outbox publisher: segment changes go from Redis to Kafka at least once.

A batch's segment changes are written to its partition's outbox (a Redis stream) in the same
atomic script as the state they follow from. The publisher sends each entry to
``segment-changes`` and to the compacted ``customer-segments`` (both keyed by customer, so a
new subscriber can bootstrap the present segment of every customer), waits for the broker's
acknowledgements, and only then deletes the entries. A crash or a broker outage in between
re-sends them later: consumers de-duplicate by the stable ``change_id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from state.store import RedisStore

log = logging.getLogger(__name__)

# send(topic, key, value) -> an awaitable that completes when the broker acknowledged
Send = Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]]


class OutboxPublisher:
    """Drains the outboxes of the partitions this worker owns.

    Parameters
    ----------
    store
        The Redis store.
    send
        Produces one record and returns an awaitable of its acknowledgement.
    changes_topic, segments_topic
        ``segment-changes`` and the compacted ``customer-segments``.
    batch
        Entries read per partition and round.
    """

    def __init__(self, store: RedisStore, send: Send, changes_topic: str, segments_topic: str,
                 batch: int = 1000):
        self.store, self.send = store, send
        self.changes_topic, self.segments_topic = changes_topic, segments_topic
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
                    acks = []
                    for _, value in entries:
                        key = str(json.loads(value)["customer_id"]).encode()
                        data = value.encode()
                        acks.append(await self.send(self.changes_topic, key, data))
                        acks.append(await self.send(self.segments_topic, key, data))
                    await asyncio.gather(*acks)
                    await self.store.outbox_ack(p, [eid for eid, _ in entries])
                    total += len(entries)
                    if len(entries) < self.batch:
                        break
        self.published += total
        return total
