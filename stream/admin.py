"""Operations on stored customers: erasure (data-protection requests)."""

from __future__ import annotations

from stream.app import partition_for
from stream.runner import store_for
from stream.settings import Settings


async def forget_customer(settings: Settings, customer_id: str) -> bool:
    """Erase a customer from every partition's state (the default partitioner's first), with
    its unpublished outbox entries, and queue a tombstone (null value) for it on the compacted
    customer-segments topic, which the partition owner's outbox publisher sends after anything
    about the customer it may have in flight; True when any state existed."""
    store = store_for(settings)
    first = partition_for(customer_id, settings.partitions)
    found = False
    try:
        for p in [first, *(q for q in range(settings.partitions) if q != first)]:
            existed, _ = await store.forget(p, customer_id)
            found = found or existed
    finally:
        await store.client.aclose()
    return found
