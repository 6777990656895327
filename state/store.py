"""The Redis store: RFM state, population statistics, stored segments and model snapshots.

A thin adapter over the Lua scripts in ``state/lua/`` (each file's header gives its ``KEYS``,
``ARGV`` and reply). Scripts are registered once and called by SHA (redis-py reloads them
after ``SCRIPT FLUSH``). One call per (partition, batch): the batch's records are applied
atomically with the partition's last applied offset, so a redelivered batch changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from state.keys import PartitionKeys, model_key
from state.rfm import BatchOutcome, CustomerState, Limits, Record


class StoreError(RuntimeError):
    """A Redis reply that breaks the store's invariants."""


def _script_text(name: str) -> str:
    return resources.files("state").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class StoredCustomer:
    """A customer's state as stored, with the segment and cluster last published for it.

    ``state.recent_event_ids``/``recent_order_ids`` are left empty (the batch reply omits
    them; :meth:`RedisStore.read_customer` fills them).
    """

    customer_id: str
    state: CustomerState
    segment: str | None
    cluster: int | None


@dataclass(frozen=True, slots=True)
class BatchApplied:
    """Reply of :meth:`RedisStore.apply_batch`.

    ``changed``: customers to whom at least one event was applied; ``first_purchase``: those
    whose first purchase this batch applied.
    """

    outcome: BatchOutcome
    last_offset_before: int
    customers: dict[str, StoredCustomer]
    changed: frozenset[str]
    first_purchase: frozenset[str]


@dataclass(frozen=True, slots=True)
class SegmentWrite:
    """A compare-and-set of one customer's stored segment and cluster."""

    customer_id: str
    expected_segment: str | None
    expected_cluster: int | None
    segment: str
    cluster: int | None


def _opt(value: Any) -> str:
    return "" if value is None else str(value)


def _opt_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)  # type: ignore[arg-type]


def _state_from(fields: Sequence[str]) -> CustomerState:
    return CustomerState(
        frequency=int(fields[0] or 0),
        purchases_minor=int(fields[1] or 0),
        refunds_minor=int(fields[2] or 0),
        last_purchase_ms=_opt_int(fields[3]),
        first_purchase_ms=_opt_int(fields[4]),
    )


class RedisStore:
    """Customer state in Redis for one namespace.

    Parameters
    ----------
    client
        A ``redis.asyncio.Redis`` created with ``decode_responses=True``.
    namespace
        Key namespace (``rfm:<namespace>:...``); a replay can rebuild into a fresh one.
    limits
        Memory bounds per customer (recent event ids, recent order ids).
    """

    def __init__(self, client: aioredis.Redis, namespace: str, limits: Limits = Limits()):
        self.client = client
        self.namespace = namespace
        self.limits = limits
        self._apply = client.register_script(_script_text("apply_batch.lua"))
        self._count = client.register_script(_script_text("count_worse.lua"))
        self._set_segments = client.register_script(_script_text("set_segments.lua"))

    def keys(self, partition: int) -> PartitionKeys:
        return PartitionKeys(self.namespace, partition)

    async def apply_batch(self, partition: int, records: Sequence[Record]) -> BatchApplied:
        """Apply one partition's batch (offset order) in one atomic script call.

        Records without an event (dead letters) only advance the applied offset.

        Raises
        ------
        ValueError
            When the batch is empty or not in ascending offset order.
        redis.exceptions.RedisError
            When Redis is unreachable or the script fails; nothing was applied then.
        """
        if not records:
            raise ValueError("empty batch")
        offsets = [r.offset for r in records]
        if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise ValueError(f"batch of partition {partition} is not in ascending offset order")
        k = self.keys(partition)
        index: dict[str, int] = {}
        args: list[Any] = []
        for rec in records:
            if rec.event is None or rec.customer_id is None:
                continue
            ci = index.setdefault(rec.customer_id, len(index) + 1)
            e = rec.event
            args += [rec.offset, ci, e.event_id, e.order_id, "r" if e.kind == "refund" else "p",
                     e.amount_minor, e.occurred_ms]
        ids = list(index)
        keys = [k.meta, k.z_last, k.z_freq, k.z_mon]
        for cid in ids:
            keys += [k.customer(cid), k.event_ids(cid), k.order_ids(cid)]
        argv = [offsets[-1], self.limits.event_ids, self.limits.order_ids, len(ids), *ids, *args]
        reply = await self._apply(keys=keys, args=argv)
        applied, dup_off, dup_ev, before = (int(x) for x in reply[:4])
        if len(reply) != 4 + 8 * len(ids):
            raise StoreError(f"apply_batch returned {len(reply)} values for {len(ids)} customers")
        customers, changed, first = {}, set(), set()
        for j, cid in enumerate(ids):
            f = reply[4 + 8 * j: 12 + 8 * j]
            customers[cid] = StoredCustomer(cid, _state_from(f), f[5] or None, _opt_int(f[6]))
            if f[7]:
                changed.add(cid)
            if f[7] == "n":
                first.add(cid)
        return BatchApplied(BatchOutcome(applied, dup_off, dup_ev), before, customers,
                            frozenset(changed), frozenset(first))

    async def population_counts(
        self, partitions: Iterable[int], queries: Sequence[tuple[int, int, int]]
    ) -> tuple[int, list[tuple[int, int, int]]]:
        """Population size and, per query, how many customers are strictly worse.

        Parameters
        ----------
        partitions
            Every partition of the input topic (the population is their union).
        queries
            ``(recency_bound_ms, frequency, monetary_minor)`` per customer: a customer whose
            last purchase is <= ``recency_bound_ms`` has a strictly larger recency in days;
            strictly smaller frequency/monetary is worse.

        Returns
        -------
        (int, list of (int, int, int))
            Population N and ``(worse_r, worse_f, worse_m)`` per query, summed over partitions.
        """
        argv: list[Any] = [x for q in queries for x in q]
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            k = self.keys(p)
            await self._count(keys=[k.z_last, k.z_freq, k.z_mon], args=argv, client=pipe)
        replies = await pipe.execute()
        total = 0
        sums = [[0, 0, 0] for _ in queries]
        for reply in replies:
            total += int(reply[0])
            for j in range(len(queries)):
                for d in range(3):
                    sums[j][d] += int(reply[1 + 3 * j + d])
        return total, [(a, b, c) for a, b, c in sums]

    async def set_segments(self, partition: int, writes: Sequence[SegmentWrite]) -> list[bool]:
        """Compare-and-set stored segments/clusters of one partition's customers, atomically.

        Returns one bool per write: False when the stored value was not the expected one.
        """
        if not writes:
            return []
        k = self.keys(partition)
        keys = [k.segcount] + [k.customer(w.customer_id) for w in writes]
        argv = [x for w in writes for x in (_opt(w.expected_segment), _opt(w.expected_cluster),
                                               w.segment, _opt(w.cluster))]
        reply = await self._set_segments(keys=keys, args=argv)
        return [bool(int(x)) for x in reply]

    async def partition_meta(self, partitions: Iterable[int]) -> dict[int, tuple[int, int | None]]:
        """``{partition: (last_applied_offset, max_event_ms)}``; -1 / None where nothing yet."""
        parts = list(partitions)
        pipe = self.client.pipeline(transaction=False)
        for p in parts:
            pipe.hmget(self.keys(p).meta, "offset", "wm")
        replies = await pipe.execute()
        return {p: (int(r[0]) if r[0] is not None else -1, _opt_int(r[1]))
                for p, r in zip(parts, replies, strict=True)}

    async def watermark(self, partitions: Iterable[int]) -> int | None:
        """Event-time watermark (epoch ms): the minimum over partitions of their max event time.

        Partitions that have seen no event yet are left out; None when none has.
        """
        times = [wm for _, wm in (await self.partition_meta(partitions)).values() if wm is not None]
        return min(times) if times else None

    async def segment_counts(self, partitions: Iterable[int]) -> dict[str, int]:
        """Customers per stored segment, summed over partitions."""
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.hgetall(self.keys(p).segcount)
        totals: dict[str, int] = {}
        for reply in await pipe.execute():
            for seg, n in reply.items():
                totals[seg] = totals.get(seg, 0) + int(n)
        return {s: n for s, n in totals.items() if n}

    async def read_customer(self, partition: int, customer_id: str) -> StoredCustomer | None:
        """Full state of one customer (recent ids included), or None when unknown."""
        k = self.keys(partition)
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(k.customer(customer_id), "f", "buy", "ref", "last", "first", "seg", "cl")
        pipe.lrange(k.event_ids(customer_id), 0, -1)
        pipe.lrange(k.order_ids(customer_id), 0, -1)
        fields, ev, orders = await pipe.execute()
        if all(v is None for v in fields):
            return None
        base = _state_from(fields)
        state = CustomerState(base.frequency, base.purchases_minor, base.refunds_minor,
                              base.last_purchase_ms, base.first_purchase_ms, tuple(ev), tuple(orders))
        return StoredCustomer(customer_id, state, fields[5] or None, _opt_int(fields[6]))

    async def iter_customers(self, partition: int, count: int = 1000
                             ) -> AsyncIterator[list[StoredCustomer]]:
        """All customers of a partition, in pages (SCAN; recent ids left empty)."""
        k = self.keys(partition)
        prefix_len = len(k.customer(""))
        cursor = 0
        while True:
            cursor, names = await self.client.scan(cursor, match=k.customer_pattern, count=count)
            if names:
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.hmget(name, "f", "buy", "ref", "last", "first", "seg", "cl")
                page = [StoredCustomer(name[prefix_len:], _state_from(f), f[5] or None,
                                       _opt_int(f[6]))
                        for name, f in zip(names, await pipe.execute(), strict=True)]
                yield page
            if cursor == 0:
                return

    async def save_model(self, snapshot_json: str) -> None:
        """Store the clustering model snapshot (JSON text) of this namespace."""
        await self.client.set(model_key(self.namespace), snapshot_json)

    async def load_model(self) -> str | None:
        """The stored clustering model snapshot (JSON text), or None."""
        value = await self.client.get(model_key(self.namespace))
        return None if value is None else str(value)
