"""The outbox publisher across a rebalance, against the real Redis and the real broker: a
revoked partition is no longer drained and revocation waits for the publication in flight; an
old owner that has not seen the rebalance reads nothing once the new owner claimed the
partition, so an older change cannot reach the compacted topic after a newer one."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import AIOKafkaProducer

from stream.demo import ensure_topics
from stream.kafka_io import BatchSender, bootstrap_of, read_all
from stream.outbox import OutboxPublisher
from stream.pipeline import RawRecord
from stream.runner import store_for
from stream.services import build_services

NOW = 1_800_000_000_000


def purchase(offset: int, customer: str, day: str, partition: int = 0) -> RawRecord:
    value = json.dumps({"event_id": f"e{partition}-{offset}", "customer_id": customer,
                       "order_id": f"o{partition}-{offset}", "type": "purchase",
                       "amount": "10.00", "currency": "USD",
                       "occurred_at": f"{day}T00:00:00Z"}).encode()
    return RawRecord("purchases", partition, offset, customer.encode(), value)


class Gate:
    """Holds a publisher's sends: ``entered`` is set when a send reaches the gate, which lets
    it through (to the real producer) once ``release`` is set."""

    def __init__(self) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    def around(self, send):
        async def held(topic, records):
            self.entered.set()
            await self.release.wait()
            return await send(topic, records)
        return held


@pytest.fixture
async def world(settings):
    """Topics, a processor (writes outbox entries), a producer and stores for publishers."""
    s = settings.model_copy(update={"partitions": 2})
    await ensure_topics(s)
    services = build_services(s)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_of(s.kafka_url), acks="all")
    await producer.start()
    stores = []

    def publisher(gate: Gate | None = None) -> OutboxPublisher:
        """A publisher (a worker's) with its own Redis client; ``gate`` holds its sends."""
        store = store_for(s)
        stores.append(store)
        send = BatchSender(producer).send
        return OutboxPublisher(store, gate.around(send) if gate else send,
                               s.segment_changes_topic, s.customer_segments_topic,
                               s.dead_letter_topic)

    yield s, services, publisher
    await producer.stop()
    for store in [services.store, *stores]:
        await store.client.aclose()


async def segments_of(s, customer: str) -> list[str | None]:
    """The values the compacted topic holds for a customer, in topic order (None: a
    tombstone)."""
    return [None if v is None else json.loads(v)["current"]["segment"]
            for _, _, k, v in await read_all(bootstrap_of(s.kafka_url),
                                             s.customer_segments_topic, idle_s=0.5)
            if k == customer.encode()]


async def test_an_old_owner_that_missed_the_rebalance_cannot_publish_after_the_new_one(world):
    s, services, publisher = world
    gate = Gate()
    old, new = publisher(gate), publisher()
    await old.assign([0])
    # alice's first purchase: New Customers (fixed thresholds: 0 days, 1 order)
    await services.processor.process(0, [purchase(0, "alice", "2024-03-01")], now_ms=NOW)
    # the group gives partition 0 to the new owner; the old one has not seen the rebalance
    await new.assign([0])
    stale = asyncio.ensure_future(old.drain([0]))  # e.g. the old owner's 1 s timer
    entered = asyncio.ensure_future(gate.entered.wait())
    await asyncio.wait({stale, entered}, return_when=asyncio.FIRST_COMPLETED)
    # the new owner publishes the change, then alice's second purchase ten days later:
    # Potential Loyalists (2 orders, 0 days)
    assert await new.drain([0]) == 1
    await services.processor.process(0, [purchase(1, "alice", "2024-03-11")], now_ms=NOW)
    assert await new.drain([0]) == 1
    gate.release.set()  # whatever the old owner read now reaches the broker
    published_by_old = await stale
    entered.cancel()
    # the present segment (the compacted topic's last value) is the newer one
    assert await segments_of(s, "alice") == ["New Customers", "Potential Loyalists"]
    assert published_by_old == 0 and old.owned == set() and new.owned == {0}


async def test_revocation_waits_for_the_publication_in_flight_and_stops_the_rest(world):
    s, services, publisher = world
    gate = Gate()
    pub = publisher(gate)
    await pub.assign([0, 1])
    await services.processor.process(0, [purchase(0, "alice", "2024-03-01")], now_ms=NOW)
    await services.processor.process(1, [purchase(0, "bob", "2024-03-01", 1)], now_ms=NOW)
    inflight = asyncio.ensure_future(pub.drain([0, 1]))
    await gate.entered.wait()  # partition 0's entry is read, its send held
    revoking = asyncio.ensure_future(pub.revoke([0, 1]))
    queued = asyncio.ensure_future(pub.drain([0, 1]))  # the timer, during revocation
    for _ in range(50):
        await asyncio.sleep(0)
    assert not revoking.done() and not inflight.done()
    gate.release.set()
    await revoking
    # revocation returned after the drain in flight: its entry was acknowledged
    assert inflight.done() and inflight.result() == 1
    assert await queued == 0 and pub.owned == set()
    store = services.store
    assert await store.outbox_depth([0]) == 0
    assert [e.key for e in await store.outbox_read(1)] == ["bob"]  # left to the next owner
    assert await segments_of(s, "alice") == ["New Customers"]
    assert await segments_of(s, "bob") == []


async def test_revoking_a_partition_does_not_wait_for_another_partitions_drain(world):
    """A drain holds each partition only while it works on it: a breaker's relay, draining a
    large backlog of one partition, held the revocation of another (and the group's
    rebalance) until the revocation timed out and the relay was killed."""
    s, services, publisher = world
    gate = Gate()
    pub = publisher(gate)
    await pub.assign([0, 1])
    await services.processor.process(0, [purchase(0, "alice", "2024-03-01")], now_ms=NOW)
    await services.processor.process(1, [purchase(0, "bob", "2024-03-01", 1)], now_ms=NOW)
    inflight = asyncio.ensure_future(pub.drain([0, 1]))
    await gate.entered.wait()  # partition 0's send held: its drain goes on
    revoking = asyncio.ensure_future(pub.revoke([1]))
    done, _ = await asyncio.wait({revoking}, timeout=10)
    assert revoking in done and not inflight.done() and pub.owned == {0}
    gate.release.set()
    assert await inflight == 1  # alice's; bob's is left to partition 1's next owner
    assert [e.key for e in await services.store.outbox_read(1)] == ["bob"]
    assert await segments_of(s, "alice") == ["New Customers"]


async def test_entries_in_flight_at_a_takeover_are_left_to_the_new_owner(world):
    s, services, publisher = world
    gate = Gate()
    old, new = publisher(gate), publisher()
    await old.assign([0])
    await services.processor.process(0, [purchase(0, "alice", "2024-03-01")], now_ms=NOW)
    inflight = asyncio.ensure_future(old.drain([0]))
    await gate.entered.wait()  # the old owner read the entry before the takeover
    await new.assign([0])
    gate.release.set()
    assert await inflight == 0  # sent, but its acknowledgement to Redis was refused
    assert old.owned == set()
    assert [e.key for e in await services.store.outbox_read(0)] == ["alice"]
    assert await new.drain([0]) == 1  # a duplicate (same change_id), never a loss
    values = [json.loads(v) for _, _, k, v in await read_all(
        bootstrap_of(s.kafka_url), s.segment_changes_topic, idle_s=0.5)]
    assert len(values) == 2 and values[0]["change_id"] == values[1]["change_id"]

    # a claim Redis lost (AOF's last second, a wipe) is taken again by the owner's next read
    await services.store.client.hdel(services.store.keys(0).meta, "pub")
    await services.processor.process(0, [purchase(1, "alice", "2024-03-11")], now_ms=NOW)
    assert await new.drain([0]) == 1
    assert await segments_of(s, "alice") == ["New Customers", "New Customers",
                                             "Potential Loyalists"]
