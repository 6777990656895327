"""Operations on stored customers: erasure (data-protection requests)."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from stream.app import partition_for
from stream.kafka_io import bootstrap_of
from stream.runner import store_for
from stream.settings import Settings


async def forget_customer(settings: Settings, customer_id: str) -> bool:
    """Erase a customer from every partition's state (the default partitioner's first) and
    write a tombstone (null value) for it on the compacted customer-segments topic; True when
    any state existed."""
    store = store_for(settings)
    first = partition_for(customer_id, settings.partitions)
    found = False
    try:
        for p in [first, *(q for q in range(settings.partitions) if q != first)]:
            found = await store.forget(p, customer_id) or found
    finally:
        await store.client.aclose()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_of(settings.kafka_url), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.customer_segments_topic, None,
                                     key=customer_id.encode("utf-8"))
    finally:
        await producer.stop()
    return found
