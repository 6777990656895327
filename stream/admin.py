"""Operations on stored customers: erasure (data-protection requests), and dropping a
namespace no longer used."""

from __future__ import annotations

from state.keys import (
    PartitionKeys,
    check_namespace,
    live_frontier_key,
    replay_claim_key,
    replay_frontier_key,
)
from stream.runner import resolve_namespace, store_for
from stream.services import partition_for
from stream.settings import Settings

ALIAS_PATTERN = "rfm:alias:*"


async def forget_customer(settings: Settings, customer_id: str) -> bool:
    """Erase a customer from every partition's state (the default partitioner's first), with
    its unpublished outbox entries, and queue a tombstone (null value) for it on the compacted
    customer-segments topic, which the partition owner's outbox publisher sends after anything
    about the customer it may have in flight: in its own partition, and in any other where it
    had state or entries (one tombstone, not one per partition); True when any state
    existed."""
    store = store_for(settings)
    first = partition_for(customer_id, settings.partitions)
    found = False
    try:
        for p in [first, *(q for q in range(settings.partitions) if q != first)]:
            existed, _ = await store.forget(p, customer_id, own=p == first)
            found = found or existed
    finally:
        await store.client.aclose()
    return found


async def drop_namespace(settings: Settings, namespace: str) -> int:
    """Delete every key of ``namespace`` from Redis: each partition's state, populations, due
    set, counts, outbox and meta, the clustering model, and its frontier hashes and replay
    claim (it can be replayed into again). For a namespace no longer used: the one a
    ``replay --switch`` moved the workers away from, or a replay's kept for comparison; an
    erased customer (``forget``) stays in those until they are dropped. Returns the number of
    keys deleted (0: nothing was there). Aliases are kept.

    Raises
    ------
    ValueError
        When ``namespace`` is not a valid name, is the namespace ``settings.namespace``
        resolves to (the workers'), or is the target of an alias (``rfm:alias:<name>``).
    redis.exceptions.RedisError
        When Redis fails; keys deleted before stay deleted (run it again).
    """
    check_namespace(namespace)
    if namespace == resolve_namespace(settings).namespace:
        raise ValueError(f"namespace {namespace!r} is the one RFM_NAMESPACE="
                         f"{settings.namespace!r} resolves to: the workers' own")
    store = store_for(settings)
    client = store.client
    try:
        async for key in client.scan_iter(match=ALIAS_PATTERN, count=1000):
            if "{" in key:  # a key of the namespace named "alias" (an alias's name has no "{")
                continue
            try:
                target = await client.get(key) if await client.type(key) == "string" else None
            except UnicodeDecodeError:  # written by hand: names no namespace
                continue
            if target == namespace:
                raise ValueError(f"namespace {namespace!r} is the target of the alias {key!r}: "
                                 "the namespace its name resolves to")
        # every key of a partition carries its hash tag: "rfm:<ns>:{p<N>}:..." (state.keys);
        # a namespace has no ':' so this matches no other namespace's keys
        prefix = PartitionKeys(namespace, 0).prefix.rsplit("{", 1)[0]
        deleted, batch = 0, []
        async for key in client.scan_iter(match=prefix + "\\{p*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await client.unlink(*batch)
                batch = []
        singles = [live_frontier_key(namespace), replay_frontier_key(namespace),
                   replay_claim_key(namespace)]
        return deleted + await client.unlink(*batch, *singles)
    finally:
        await client.aclose()
