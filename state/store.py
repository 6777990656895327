"""The Redis store: RFM state, population statistics, segment assignments, the outbox and
model snapshots.

A thin adapter over the Lua scripts in ``state/lua/`` (each file's header gives its ``KEYS``,
``ARGV`` and reply). Scripts are registered once and called by SHA (redis-py reloads them after
``SCRIPT FLUSH``); script result codes become named exceptions.

A batch of one partition goes read -> compute -> commit: :meth:`RedisStore.read_partition`
reads what the batch needs, the caller computes new states and segment changes (pure code), and
:meth:`RedisStore.commit_batch` writes all of it in one atomic script, only if the partition's
applied offset is still the one that was read (else :class:`ConflictError`). A crash anywhere
before the commit leaves nothing behind; after it, everything (state, offset, assignments,
outbox entries) is there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from state.keys import PartitionKeys, model_key
from state.rfm import MS_PER_DAY, BatchOutcome, CustomerState, Limits, Record

_FIELDS = ("f", "buy", "ref", "last", "first", "seg", "cl")


class StoreError(RuntimeError):
    """Base class of the store's errors."""


class ConflictError(StoreError):
    """The partition's applied offset changed between read and commit (another writer).

    Attributes: ``partition``, ``expected`` and ``stored`` offsets.
    """

    def __init__(self, partition: int, expected: int, stored: int):
        super().__init__(f"partition {partition}: applied offset is {stored}, expected {expected}")
        self.partition, self.expected, self.stored = partition, expected, stored


def _script_text(name: str) -> str:
    return resources.files("state").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class StoredCustomer:
    """A customer's state as stored, with the segment and cluster last assigned to it."""

    customer_id: str
    state: CustomerState
    segment: str | None
    cluster: int | None


@dataclass(frozen=True, slots=True)
class Assigned:
    """A segment assignment to store: segment name and cluster id (None: no cluster)."""

    segment: str
    cluster: int | None


@dataclass(frozen=True, slots=True)
class PartitionView:
    """What a batch of one partition starts from.

    ``last_offset``: last applied offset (-1: none); ``watermark``: the partition's highest
    applied event time (epoch ms) or None; ``thresholds``: its scoring thresholds (JSON) or
    None; ``other_watermarks``: the highest event times of the other partitions that have one;
    ``customers``: the full stored state of each customer asked for (None when unknown).
    """

    partition: int
    last_offset: int
    watermark: int | None
    thresholds: str | None
    other_watermarks: tuple[int, ...]
    customers: dict[str, StoredCustomer | None]


@dataclass(frozen=True, slots=True)
class OrderStatistics:
    """Order statistics of the population (all partitions) at given ranks ``k`` (1-based).

    ``recency_kth_largest[i]``: the ``ranks[i]``-th largest recency in whole days at the as-of
    time; ``frequency_kth_smallest``/``monetary_kth_smallest`` likewise (orders; minor units).
    """

    population: int
    recency_kth_largest: tuple[int, ...]
    frequency_kth_smallest: tuple[int, ...]
    monetary_kth_smallest: tuple[int, ...]


def _opt(value: Any) -> str:
    return "" if value is None else str(value)


def _opt_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)  # type: ignore[arg-type]


def _stored(customer_id: str, f: Sequence[str | None], ev: Sequence[str] = (),
            orders: Sequence[str] = ()) -> StoredCustomer:
    state = CustomerState(int(f[0] or 0), int(f[1] or 0), int(f[2] or 0), _opt_int(f[3]),
                          _opt_int(f[4]), tuple(ev), tuple(orders))
    return StoredCustomer(customer_id, state, f[5] or None, _opt_int(f[6]))


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
        PartitionKeys(namespace, 0)  # validates the namespace
        self._apply = client.register_script(_script_text("apply_batch.lua"))
        self._set_thresholds = client.register_script(_script_text("set_thresholds.lua"))
        self._read = client.register_script(_script_text("read_batch.lua"))

    def keys(self, partition: int) -> PartitionKeys:
        return PartitionKeys(self.namespace, partition)

    # --- the batch path ---------------------------------------------------------------------
    async def read_partition(self, partition: int, customer_ids: Iterable[str],
                             partitions: Iterable[int]) -> PartitionView:
        """Read, in one round trip (a script call on the partition's slot and the other
        partitions' watermarks), what a batch of ``partition`` needs (see PartitionView).

        ``partitions``: every partition of the input topic (for the other watermarks).
        """
        k = self.keys(partition)
        ids = list(dict.fromkeys(customer_ids))
        others = [p for p in partitions if p != partition]
        keys = [k.meta]
        for cid in ids:
            keys += [k.customer(cid), k.event_ids(cid), k.order_ids(cid)]
        pipe = self.client.pipeline(transaction=False)
        await self._read(keys=keys, client=pipe)  # the partition's slot only
        for p in others:
            pipe.hget(self.keys(p).meta, "wm")
        reply, *other_wms = await pipe.execute()
        offset, wm, thr = reply[:3]
        customers: dict[str, StoredCustomer | None] = {}
        for i, cid in enumerate(ids):
            f, ev, orders = reply[3 + 3 * i: 6 + 3 * i]
            customers[cid] = None if all(v is None for v in f) else _stored(cid, f, ev, orders)
        return PartitionView(partition, int(offset) if offset is not None else -1,
                             _opt_int(wm), thr,
                             tuple(int(w) for w in other_wms if w is not None), customers)

    async def commit_batch(self, partition: int, expected_offset: int, records: Sequence[Record],
                           assignments: Mapping[str, Assigned],
                           outbox: Sequence[tuple[str, str]]) -> BatchOutcome:
        """Apply a batch (ascending offsets) with its assignments and outbox entries, atomically.

        ``outbox``: ``(kind, JSON)`` entries, kind ``c`` (segment change) or ``d`` (dead letter).

        Records without an event (dead letters) only advance the applied offset. Assigned
        customers must appear in ``records``.

        Raises
        ------
        ValueError
            When the batch is empty, not in ascending offset order, or assigns a customer that
            has no record.
        ConflictError
            When the stored offset is not ``expected_offset``; nothing was written.
        redis.exceptions.RedisError
            When Redis is unreachable or the script fails; nothing was written.
        """
        if not records:
            raise ValueError("empty batch")
        offsets = [r.offset for r in records]
        if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise ValueError(f"batch of partition {partition} is not in ascending offset order")
        k = self.keys(partition)
        index: dict[str, int] = {}
        events: list[Any] = []
        for rec in records:
            if rec.event is None or rec.customer_id is None:
                continue
            ci = index.setdefault(rec.customer_id, len(index) + 1)
            e = rec.event
            events += [rec.offset, ci, e.event_id, e.order_id, "r" if e.kind == "refund" else "p",
                       e.amount_minor, e.occurred_ms]
        missing = set(assignments) - set(index)
        if missing:
            raise ValueError(f"assignments for customers without records: {sorted(missing)[:3]}")
        ids = list(index)
        keys = [k.meta, k.z_last, k.z_freq, k.z_mon, k.segcount, k.outbox]
        for cid in ids:
            keys += [k.customer(cid), k.event_ids(cid), k.order_ids(cid)]
        assign_args = [x for cid, a in assignments.items()
                       for x in (index[cid], a.segment, _opt(a.cluster))]
        argv = [expected_offset, offsets[-1], self.limits.event_ids, self.limits.order_ids,
                len(ids), len(events) // 7, len(assignments), len(outbox), *ids, *events,
                *assign_args, *(x for entry in outbox for x in entry)]
        try:
            applied, dup_off, dup_ev = await self._apply(keys=keys, args=argv)
        except ResponseError as exc:
            text = str(exc)
            if text.startswith("CONFLICT"):
                raise ConflictError(partition, expected_offset, int(text.split()[1])) from exc
            raise
        return BatchOutcome(int(applied), int(dup_off), int(dup_ev))

    async def save_thresholds(self, partition: int, expected_offset: int, text: str) -> bool:
        """Store the partition's thresholds (JSON) if its applied offset is still
        ``expected_offset``; returns whether they were written."""
        return bool(await self._set_thresholds(keys=[self.keys(partition).meta],
                                               args=[expected_offset, text]))

    # --- population statistics ------------------------------------------------------------
    async def population(self, partitions: Iterable[int]) -> int:
        """Customers with at least one purchase, over ``partitions``."""
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.zcard(self.keys(p).z_last)
        return sum(int(x) for x in await pipe.execute())

    async def order_statistics(self, partitions: Iterable[int], as_of_ms: int,
                               ranks: Sequence[int]) -> OrderStatistics:
        """Order statistics of the population of all ``partitions`` at the given ranks.

        Exact: a binary search over values, each step one pipelined round trip of ``ZCOUNT``s
        over every partition's sorted sets (about 40 round trips). Customers whose last
        purchase is after ``as_of_ms`` have recency 0.

        Raises
        ------
        ValueError
            When a rank is outside ``1..population``.
        """
        parts = list(partitions)
        keysets = [self.keys(p) for p in parts]
        pipe = self.client.pipeline(transaction=False)
        for k in keysets:
            pipe.zcard(k.z_last)
            pipe.zrange(k.z_last, 0, 0, withscores=True)
            pipe.zrange(k.z_freq, -1, -1, withscores=True)
            pipe.zrange(k.z_mon, -1, -1, withscores=True)
        reply = await pipe.execute()
        n = sum(int(reply[4 * i]) for i in range(len(parts)))
        if any(not 1 <= r <= n for r in ranks):
            raise ValueError(f"ranks {list(ranks)} outside 1..{n}")
        first_last = min(int(reply[4 * i + 1][0][1]) for i in range(len(parts))
                         if reply[4 * i + 1])
        max_f = max((int(reply[4 * i + 2][0][1]) for i in range(len(parts)) if reply[4 * i + 2]),
                    default=0)
        max_m = max((int(reply[4 * i + 3][0][1]) for i in range(len(parts)) if reply[4 * i + 3]),
                    default=0)
        max_days = max(0, (as_of_ms - first_last) // MS_PER_DAY)

        # recency: largest m with #(recency >= m) >= k; #(recency >= m) = #(last <= as_of - m d)
        # frequency / monetary: smallest v with #(value <= v) >= k
        searches: list[tuple[str, int, int, int]] = []  # (kind, k, lo, hi)
        searches += [("r", k, 0, max_days) for k in ranks]
        searches += [("f", k, 0, max_f) for k in ranks]
        searches += [("m", k, 0, max_m) for k in ranks]
        lo = [s[2] for s in searches]
        hi = [s[3] for s in searches]
        while any(a < b for a, b in zip(lo, hi, strict=True)):
            pipe = self.client.pipeline(transaction=False)
            probes = []
            for i, (kind, _, _, _) in enumerate(searches):
                if lo[i] >= hi[i]:
                    probes.append(None)
                    continue
                if kind == "r":
                    mid = (lo[i] + hi[i] + 1) // 2
                    probes.append(mid)
                    for ks in keysets:
                        pipe.zcount(ks.z_last, "-inf", as_of_ms - mid * MS_PER_DAY)
                else:
                    mid = (lo[i] + hi[i]) // 2
                    probes.append(mid)
                    key = "z_freq" if kind == "f" else "z_mon"
                    for ks in keysets:
                        pipe.zcount(getattr(ks, key), "-inf", mid)
            counts = iter(await pipe.execute())
            for i, (kind, k, _, _) in enumerate(searches):
                mid = probes[i]
                if mid is None:
                    continue
                c = sum(int(next(counts)) for _ in keysets)
                if kind == "r":
                    lo[i], hi[i] = (mid, hi[i]) if c >= k else (lo[i], mid - 1)
                else:
                    lo[i], hi[i] = (lo[i], mid) if c >= k else (mid + 1, hi[i])
        r = len(ranks)
        return OrderStatistics(n, tuple(lo[:r]), tuple(lo[r:2 * r]), tuple(lo[2 * r:]))

    # --- the outbox -------------------------------------------------------------------------
    async def outbox_read(self, partition: int, count: int = 500
                          ) -> list[tuple[str, str, str]]:
        """The oldest ``count`` outbox entries of a partition: ``(entry id, kind, JSON)``."""
        rows = await self.client.xrange(self.keys(partition).outbox, "-", "+", count=count)
        return [(eid, fields.get("k", "c"), fields["v"]) for eid, fields in rows]

    async def outbox_ack(self, partition: int, entry_ids: Sequence[str]) -> int:
        """Delete entries the broker acknowledged; returns how many were deleted."""
        if not entry_ids:
            return 0
        return int(await self.client.xdel(self.keys(partition).outbox, *entry_ids))

    async def outbox_depth(self, partitions: Iterable[int]) -> int:
        """Entries waiting in the outboxes of ``partitions``."""
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.xlen(self.keys(p).outbox)
        return sum(int(x) for x in await pipe.execute())

    # --- reads --------------------------------------------------------------------------------
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

    async def thresholds(self, partition: int) -> str | None:
        """The partition's current thresholds (JSON), or None."""
        value = await self.client.hget(self.keys(partition).meta, "thr")
        return None if value is None else str(value)

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
        view = await self.read_partition(partition, [customer_id], [partition])
        return view.customers[customer_id]

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
                    pipe.hmget(name, *_FIELDS)
                yield [_stored(name[prefix_len:], f)
                       for name, f in zip(names, await pipe.execute(), strict=True)]
            if cursor == 0:
                return

    async def save_model(self, snapshot_json: str) -> None:
        """Store the clustering model snapshot (JSON text) of this namespace."""
        await self.client.set(model_key(self.namespace), snapshot_json)

    async def load_model(self) -> str | None:
        """The stored clustering model snapshot (JSON text), or None."""
        value = await self.client.get(model_key(self.namespace))
        return None if value is None else str(value)
