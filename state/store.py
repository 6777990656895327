"""The Redis store: RFM state, population statistics, segment assignments, the outbox and
model snapshots.

A thin adapter over the Lua scripts in ``state/lua/`` (each file's header gives its ``KEYS``,
``ARGV`` and reply). Scripts are registered once and called by SHA (redis-py reloads them after
``SCRIPT FLUSH``); script result codes become named exceptions.

A step of one partition goes read -> compute -> commit: :meth:`RedisStore.read_partition`
reads what the step needs, the caller computes new states and segment changes (pure code), and
:meth:`RedisStore.commit` writes all of it in one atomic script, only if the partition's
commit sequence is still the one that was read (else :class:`ConflictError`). A crash anywhere
before the commit leaves nothing behind; after it, everything (state, offset, watermark,
published segments, due times, outbox entries) is there.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple

import msgpack
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from state.codec import FORMAT, StoredCustomer, decode, encode, opt_int
from state.keys import PartitionKeys, layout_key, live_frontier_key, model_keys
from state.rfm import MS_PER_DAY

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """Base class of the store's errors."""


class ConflictError(StoreError):
    """The partition's commit sequence changed between read and commit (another writer).

    Attributes: ``partition``, ``expected`` and ``stored`` sequence numbers.
    """

    def __init__(self, partition: int, expected: int, stored: int):
        super().__init__(f"partition {partition}: commit seq is {stored}, expected {expected}")
        self.partition, self.expected, self.stored = partition, expected, stored


class UnreadableCustomers(ValueError):
    """Customers whose stored value cannot be read: malformed, of a format this store cannot
    write back, or a key of another Redis type (written by hand or by a bug). A step of their
    own events cannot be planned; the worker dead-letters those events and applies the rest.

    Attributes: ``reasons``, customer id -> why (a sentence that names the customer).
    """

    def __init__(self, reasons: dict[str, str]):
        super().__init__("; ".join(reasons.values()))
        self.reasons = reasons


class FencedError(StoreError):
    """Another publisher claimed the partition's outbox (a newer owner of the partition).

    Attributes: ``partition`` and ``holder`` (the token that holds it).
    """

    def __init__(self, partition: int, holder: str):
        super().__init__(f"partition {partition}: outbox claimed by another publisher ({holder})")
        self.partition, self.holder = partition, holder


class LayoutError(ValueError):
    """A namespace written with one population layout, asked to work with the other."""


def _raise_fenced(partition: int, exc: ResponseError) -> None:
    """Raise FencedError when a script's error reply is ``FENCED <holder>``."""
    text = str(exc)
    if text.startswith("FENCED"):
        raise FencedError(partition, text.partition(" ")[2]) from exc


def _queue_mget(pipe: Any, keys: PartitionKeys, customer_ids: Sequence[str]) -> int:
    """Queue MGETs of the customers' values on ``pipe`` (1,000 keys a call, all in the
    partition's slot); returns how many were queued (their replies, in order, hold the values
    in the order of ``customer_ids``)."""
    starts = range(0, len(customer_ids), 1000)
    for i in starts:
        _mget_bytes(pipe, [keys.customer(c) for c in customer_ids[i:i + 1000]])
    return len(starts)


def _mget_bytes(client: Any, names: list[str]) -> Any:
    """``MGET`` of customer values as bytes (MessagePack, ``state.codec``), on a client or
    pipeline created with ``decode_responses=True``: the reply skips the text decoding."""
    return client.execute_command("MGET", *names, keys=names, **{NEVER_DECODE: []})


def _customer_or_none(customer_id: str, value: bytes | None, text_ids: bool = False
                      ) -> StoredCustomer | None:
    """A customer read for a step of other customers' events (a due time, or a re-score after
    a threshold refresh): None, as if erased, when its value cannot be decoded (an error is
    logged). Such steps would otherwise fail all of the partition's records, and the worker
    with them, again at each restart; this way the step drops its due time and goes on, the
    value stays as it is, and the customer's own events still fail (``processing_error`` dead
    letters, re-sendable once the value is repaired). ``text_ids``: as ``decode``'s."""
    try:
        return decode(customer_id, value, text_ids=text_ids)
    except ValueError as exc:
        log.error("customer %r has an unreadable stored value, left as it is and not "
                  "re-scored: %s", customer_id, exc)
        return None


def _script_text(name: str) -> str:
    return resources.files("state").joinpath("lua", name).read_text(encoding="utf-8")


LAYOUTS = ("sorted_sets", "chunked")


@dataclass(frozen=True, slots=True)
class PartitionClock:
    """A partition's event-time progress: highest applied event time and the wall clock of
    its last applied event (epoch ms; None when it has none)."""

    partition: int
    watermark: int | None
    seen_ms: int | None


@dataclass(frozen=True, slots=True)
class PartitionView:
    """What a step of one partition starts from.

    ``seq``: commit sequence (-1: none; the compare-and-set token); ``last_offset``: last
    applied offset (-1: none); ``watermark``: highest applied event time (epoch ms) or None;
    ``as_of``: the partition's as-of time so far or None; ``thresholds``: its scoring
    thresholds (JSON) or None; ``others``: the other partitions' clocks; ``customers``: each
    customer asked for, and each due customer (None when unknown); ``dues``: ``(due_ms, id)``
    of the customers due by the furthest as-of the step can reach, ascending;
    ``dues_capped``: more may be due than were returned; ``seen_ms``: wall clock of the
    partition's last applied event; ``model_version``: version of the latest clustering
    model snapshot; ``rules``: the segment rule table the partition's stored segments were
    assigned under, ``"<SegmentTable.rules_digest> <commit sequence it was recorded at>"``
    (None before one was recorded).
    """

    partition: int
    seq: int
    last_offset: int
    watermark: int | None
    as_of: int | None
    thresholds: str | None
    others: tuple[PartitionClock, ...]
    customers: dict[str, StoredCustomer | None]
    dues: tuple[tuple[int, str], ...] = ()
    dues_capped: bool = False
    seen_ms: int | None = None
    model_version: int | None = None
    rules: str | None = None


class CustomerWrite(NamedTuple):
    """One customer's part of a commit.

    ``customer`` is the full new stored form (None: only ``due_ms`` is written, keeping an
    earlier due if there is one). ``population``: its (last purchase ms, frequency, monetary
    minor) for the population sorted sets, or None when it is not scored. ``due_ms``: when
    it must be re-scored without an event (None: never). ``previous_segment``: the segment
    stored before this write, as the step read it (the per-segment counts move from it).
    ``population_kept``: the population sorted sets hold ``population`` already (a re-score
    of an unchanged state): they are not written. ``previous_population``: the values the
    populations hold for the customer before this write (None: in none), which the chunked
    layout finds it by.
    """

    customer_id: str
    due_ms: int | None
    customer: StoredCustomer | None = None
    population: tuple[int, int, int] | None = None
    previous_segment: str | None = None
    population_kept: bool = False
    previous_population: tuple[int, int, int] | None = None


class OutboxEntry(NamedTuple):
    """One outbox entry: its stream id, kind (``c`` segment change, ``d`` dead letter, ``t``
    tombstone of an erased customer), value (JSON; for ``t`` the customer id) and the Kafka
    record key to publish it with (None: no key)."""

    entry_id: str
    kind: str
    value: str
    key: str | None


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


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream entry id ``<ms>-<seq>`` as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def _opt(value: Any) -> str:
    return "" if value is None else str(value)


Population = tuple[int, int, int]
CommitRow = tuple[str, str, "Population | tuple[()] | None", "bytes | None", str, str,
                  "Population | None"]


def commit_runs(rows: Iterable[CommitRow], chunked: bool = False
                ) -> list[list[list[str | bytes]]]:
    """The customers' part of a commit as ``commit.lua`` sends it: rows ``(id, due, population,
    value, old segment, new segment, old population)`` (due ``""``: none; population None: not
    scored, ``()``: kept as stored, no population command; value None: a due-only write,
    keeping the earlier of two due times; old population: the values the customer is stored
    with in the populations, None when it is in none) gathered by command into runs, each
    ``[due ZADD pairs, due ZADD LT pairs, due ZREM ids, population ZREM ids, z:last pairs,
    z:freq pairs, z:mon pairs, [id, value, ...], chunked removals of last, freq, mon (value,
    id) pairs, [segment, net change, ...]]``.

    ``chunked``: for the chunked populations (``chunks.lua``), which find a customer by its
    old value: a changed value of a dimension is a removal of the old pair and an addition of
    the new one, an unchanged one neither, and the ZREM ids stay empty. Else the sorted sets
    are written by id (ZADD overwrites) and the removals stay empty.

    Commands of one kind on different customers commute, so a run sends each kind as one
    variadic call; a customer written twice starts a new run, so its writes keep their order.
    A segment a write moves from or to is in the run's changes even when they net to zero
    (HINCRBY by 0 creates the field, as the writes one by one did).
    """
    runs: list[list[list[str | bytes]]] = []
    seen: set[str] = set()
    run: list[list[str | bytes]] = []
    delta: dict[str, int] = {}
    for cid, due, pop, value, old, new, before in rows:
        if not run or cid in seen:
            if run:
                run.append([x for seg, n in delta.items() for x in (seg, str(n))])
            run, delta, seen = [[] for _ in range(11)], {}, set()
            runs.append(run)
        seen.add(cid)
        if value is None:
            if due == "":
                run[2].append(cid)
            else:
                run[1] += (due, cid)
            continue
        if due == "":
            run[2].append(cid)
        else:
            run[0] += (due, cid)
        if chunked:
            if pop != ():
                for k in range(3):
                    was = None if before is None else before[k]
                    now = None if pop is None else pop[k]
                    if was != now:
                        if was is not None:
                            run[8 + k] += (str(was), cid)
                        if now is not None:
                            run[4 + k] += (str(now), cid)
        elif pop is None:
            run[3].append(cid)
        elif pop:
            run[4] += (str(pop[0]), cid)
            run[5] += (str(pop[1]), cid)
            run[6] += (str(pop[2]), cid)
        run[7] += (cid, value)
        if old != new:
            if old:
                delta[old] = delta.get(old, 0) - 1
            if new:
                delta[new] = delta.get(new, 0) + 1
    if run:
        run.append([x for seg, n in delta.items() for x in (seg, str(n))])
    return runs


def commit_payload(meta: Mapping[str, str], rows: Iterable[CommitRow], key_prefix: str,
                   outbox: Iterable[tuple[str, str, str | None]],
                   model: tuple[str, str] | None,
                   chunk_bases: tuple[str, str, str] | None = None) -> bytes:
    """``commit.lua``'s ARGV[2] (MessagePack): the meta fields to set, the customers' rows
    gathered by :func:`commit_runs`, the customers' key prefix, the outbox entries ``(kind,
    text, record key or None)``, the model snapshot ``(version, JSON)`` or None, and the
    chunked populations' key prefixes (None: the sorted sets). What is absent travels as
    false (a nil would end a Lua array). The customers' values (bytes) travel as MessagePack
    raw strings: Redis's Lua cmsgpack reads no bin type."""
    return msgpack.packb({
        "meta": meta, "runs": commit_runs(rows, chunk_bases is not None),
        "keyprefix": key_prefix, "chunks": list(chunk_bases) if chunk_bases else False,
        "outbox": [[kind, text, False if key is None else key] for kind, text, key in outbox],
        "model": list(model) if model else False}, use_bin_type=False)  # values: bytes


_PROBES = 32  # probes per search and round of RedisStore.order_statistics
# its first round's probes around a hint (at most _PROBES): gaps of at most 32 up to ±256,
# so a value that moved by up to 256 is found exactly in the next round
_AROUND = tuple(sorted({0, *(s * d for d in (1, 3, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256,
                                             512, 2048) for s in (-1, 1))}))


def _bound(x: float) -> str:
    """A sorted-set score bound as Redis reads it (integers exactly, infinities as +-inf)."""
    if x == float("inf"):
        return "+inf"
    if x == float("-inf"):
        return "-inf"
    return str(int(x))


def _int(value: str | None, default: int) -> int:
    return default if value in (None, "") else int(value)  # type: ignore[arg-type]


@dataclass
class _PartitionCache:
    """The customers a writer committed to one partition, valid while the partition's commit
    token is ``token``."""

    token: str
    customers: OrderedDict[str, StoredCustomer] = field(default_factory=OrderedDict)


class RedisStore:
    """Customer state in Redis for one namespace.

    Parameters
    ----------
    client
        A ``redis.asyncio.Redis`` created with ``decode_responses=True``.
    namespace
        Key namespace (``rfm:<namespace>:...``); a replay can rebuild into a fresh one.
    cache_customers
        A writer's cache of the customers it committed, per partition (0: none). Each commit
        stores a random token in the partition's meta; a step's read returns it, and the
        cached customers are used only while it is the token of this store's own last commit
        (another writer, a ``forget``, or a Redis that lost writes changes or drops it: the
        cache of that partition is dropped). Saves reading and decoding hot customers; bounded
        (over the bound, the least recently committed customers of the largest partition cache
        are dropped first).
    write_format
        Format of the customer values written (``state.codec``): 4, or 3 or 2 for a rolling
        upgrade from releases that read only those. All are read; a store writing 2 or 3
        reads the customers of those formats with their ids as text
        (``state.rfm.Limits.text_ids``, which its pipeline sets too), and writes a customer
        already in format 4 in format 4 (its ids are digests).
    population_layout
        ``sorted_sets`` (one sorted set per population: ``z:last``, ``z:freq``, ``z:mon``) or
        ``chunked`` (``state/lua/chunks.lua``: ~60 B per customer instead of ~310, for several
        times the Redis time per write and per count; its commits need each write's
        ``previous_population``, so it cannot serve a window, whose values move without a
        write). :meth:`check_layout` holds a namespace to one.
    """

    def __init__(self, client: aioredis.Redis, namespace: str, cache_customers: int = 0,
                 write_format: int = FORMAT, population_layout: str = "sorted_sets"):
        if population_layout not in LAYOUTS:
            raise ValueError(f"population layout {population_layout!r}: not one of {LAYOUTS}")
        self.client = client
        self.population_layout = population_layout
        self.chunked = population_layout == "chunked"
        self.namespace = namespace
        self.cache_customers = cache_customers
        self.write_format = write_format
        self.text_ids = write_format < FORMAT
        self._cache: dict[int, _PartitionCache] = {}
        PartitionKeys(namespace, 0)  # validates the namespace
        chunks = _script_text("chunks.lua")
        self._commit = client.register_script((chunks if self.chunked else "")
                                              + _script_text("commit.lua"))
        self._read = client.register_script(_script_text("read.lua"))
        self._forget = client.register_script(chunks + _script_text("forget.lua"))
        self._populations = client.register_script(chunks + _script_text("populations.lua"))
        self._sample = client.register_script(_script_text("sample.lua"))
        self._between = client.register_script(_script_text("between.lua"))
        self._counts = client.register_script(_script_text("counts.lua"))
        self._outbox_read = client.register_script(_script_text("outbox_read.lua"))
        self._outbox_ack = client.register_script(_script_text("outbox_ack.lua"))

    def keys(self, partition: int) -> PartitionKeys:
        return PartitionKeys(self.namespace, partition)

    async def check_layout(self, partitions: Iterable[int]) -> None:
        """Hold the namespace to this store's population layout: the first store to ask
        records its own (``state.keys.layout_key``), or ``sorted_sets`` when some of
        ``partitions`` already hold population sorted sets (a namespace written before
        layouts were recorded).

        Raises
        ------
        LayoutError
            When the namespace was written with the other layout (its populations would be
            read as empty and written twice over).
        """
        key = layout_key(self.namespace)
        stored = await self.client.get(key)
        if stored is None:
            legacy = await self.client.exists(*(self.keys(p).z_last for p in partitions))
            await self.client.set(key, "sorted_sets" if legacy else self.population_layout,
                                  nx=True)
            stored = await self.client.get(key)
        if stored != self.population_layout:
            raise LayoutError(
                f"namespace {self.namespace!r} keeps its populations as {stored}, not "
                f"{self.population_layout} (RFM_POPULATION_LAYOUT): set it to {stored}, or "
                f"replay into a new namespace with the layout wanted")

    # --- the step path ----------------------------------------------------------------------
    async def read_partition(self, partition: int, customer_ids: Iterable[str],
                             partitions: Iterable[int], hint_ms: int | None = None,
                             max_due: int = 10_000) -> PartitionView:
        """Read, in one round trip (a script and MGETs on the partition's slot, pipelined with
        the other partitions' clocks), what a step of ``partition`` needs (see PartitionView).

        ``partitions``: every partition of the input topic; ``hint_ms``: the furthest event
        time the step may reach (the due customers up to it are read too, at most
        ``max_due``; ``max_due=0`` reads none).

        The pipeline is not a transaction (it spans slots): another writer's commit may land
        between the script and the MGETs. A step planned from such a read is refused by
        :meth:`commit` (every writer moves the sequence read here first), and re-read.

        Raises
        ------
        UnreadableCustomers
            When some of ``customer_ids`` have a stored value that cannot be decoded, or a key
            of another Redis type (found by a second round trip, made only when some of the
            customers have no value: new ones, or such keys); it names them all.
        """
        k = self.keys(partition)
        ids = list(dict.fromkeys(customer_ids))
        cache = self._cache.get(partition)
        cached = cache.customers if cache is not None else {}
        # taken before any await: another partition's commit may evict from this cache
        hits = {c: cached[c] for c in ids if c in cached}
        ask = [c for c in ids if c not in hits]
        others = [p for p in partitions if p != partition]
        pipe = self.client.pipeline(transaction=False)
        await self._read(keys=[k.meta, k.due], args=["" if hint_ms is None else hint_ms, max_due],
                         client=pipe)
        chunks = _queue_mget(pipe, k, ask)
        for p in others:
            pipe.hmget(self.keys(p).meta, "wm", "seen")
        pipe.get(model_keys(self.namespace)[1])
        reply, *rest = await pipe.execute()
        named = [v for part in rest[:chunks] for v in part]
        clocks, version = rest[chunks:-1], rest[-1]
        (offset, wm, asof, thr, seq, seen, token, rules), due_flat = reply
        if cache is not None and token != cache.token:  # someone else wrote: read it all
            self._cache.pop(partition, None)  # a commit in flight may have taken it
            return await self.read_partition(partition, ids, partitions, hint_ms, max_due)
        dues = tuple((int(float(due_flat[i + 1])), due_flat[i])
                     for i in range(0, len(due_flat), 2))
        customers, unreadable = self._decode_all(ask, named)
        absent = {k.customer(cid): cid for cid, v in zip(ask, named, strict=True) if v is None}
        if absent:  # new customers, or keys of another type (MGET answers nil for both)
            for name, reason in (await self._not_strings(list(absent))).items():
                unreadable[absent[name]] = f"customer {absent[name]!r}: {reason}"
        if unreadable:
            raise UnreadableCustomers(unreadable)
        customers.update(hits)
        # the due customers this store did not commit itself: a second round trip
        due_hits = {cid: cached.get(cid) for _, cid in dues if cid not in customers}
        unknown = [cid for cid, c in due_hits.items() if c is None]
        if unknown:
            pipe = self.client.pipeline(transaction=False)
            _queue_mget(pipe, k, unknown)
            values = [v for part in await pipe.execute() for v in part]
            due_hits.update(await self._others(partition, unknown, values))
        customers.update(due_hits)
        return PartitionView(
            partition, _int(seq, -1), _int(offset, -1), opt_int(wm), opt_int(asof), thr,
            tuple(PartitionClock(p, opt_int(c[0]), opt_int(c[1]))
                  for p, c in zip(others, clocks, strict=True)),
            customers, dues, max_due > 0 and len(dues) >= max_due, opt_int(seen),
            opt_int(version), rules)

    def _decode_all(self, ids: list[str], values: list[bytes | None]
                    ) -> tuple[dict[str, StoredCustomer | None], dict[str, str]]:
        """The customers of ``values`` that decode, and why each of the others does not."""
        out: dict[str, StoredCustomer | None] = {}
        unreadable: dict[str, str] = {}
        for cid, v in zip(ids, values, strict=True):
            try:
                out[cid] = decode(cid, v, text_ids=self.text_ids)
            except ValueError as exc:
                unreadable[cid] = str(exc)
        return out, unreadable

    async def read_customers(self, partition: int, customer_ids: Iterable[str],
                             others: bool = False) -> dict[str, StoredCustomer | None]:
        """Several customers of one partition (None where unknown). ``others``: read for a
        step of other customers' events (a re-score), so an unreadable value is logged and
        read as None (see ``_customer_or_none``) instead of raising.

        Raises
        ------
        UnreadableCustomers
            Without ``others``, when some stored values cannot be decoded.
        """
        ids = list(dict.fromkeys(customer_ids))
        k = self.keys(partition)
        cache = self._cache.get(partition)
        cached = cache.customers if cache is not None else {}
        hits = {c: cached[c] for c in ids if c in cached}  # before the await (see above)
        ask = [c for c in ids if c not in hits]
        pipe = self.client.pipeline(transaction=False)
        if cache is not None:
            pipe.hget(k.meta, "tok")
        _queue_mget(pipe, k, ask)
        replies = await pipe.execute()
        if cache is not None:
            if replies[0] != cache.token:
                self._cache.pop(partition, None)
                return await self.read_customers(partition, ids, others)
            replies = replies[1:]
        values = [v for reply in replies for v in reply]
        if others:
            out = await self._others(partition, ask, values)
        else:
            out, unreadable = self._decode_all(ask, values)
            if unreadable:
                raise UnreadableCustomers(unreadable)
        return {cid: out[cid] if cid in out else hits[cid] for cid in ids}

    async def commit(self, partition: int, expected_seq: int, meta: Mapping[str, str | int],
                     writes: Sequence[CustomerWrite],
                     outbox: Sequence[tuple[str, str, str | None]],
                     model: tuple[int, str] | None = None) -> int:
        """Write a planned step atomically if the partition's commit sequence is still
        ``expected_seq``; returns the new sequence.

        ``meta``: partition meta fields to set (``offset``, ``wm``, ``asof``, ``seen``,
        ``thr``); ``outbox``: ``(kind, JSON, record key or None)`` entries, kind ``c``
        (segment change) or ``d`` (dead letter); ``model``: ``(version, snapshot JSON)`` a
        training step published (the trainer partition only).

        Raises
        ------
        ConflictError
            When the stored sequence is not ``expected_seq``; nothing was written.
        redis.exceptions.RedisError
            When Redis is unreachable or the script fails; nothing was written.
        """
        k = self.keys(partition)
        token = secrets.token_hex(8)
        payload = commit_payload(
            {**{f: str(v) for f, v in meta.items()}, "tok": token},
            ((w.customer_id, _opt(w.due_ms), () if w.population_kept else w.population,
              None if w.customer is None else encode(w.customer, self.write_format),
              w.previous_segment or "",
              "" if w.customer is None else w.customer.segment or "",
              w.previous_population) for w in writes),
            k.customer(""), outbox, (str(model[0]), model[1]) if model else None,
            k.chunk_bases if self.chunked else None)
        args = [expected_seq, payload]
        keys = [k.meta, k.z_last, k.z_freq, k.z_mon, k.due, k.segcount, k.outbox, k.model,
                k.model_version]
        cache = self._cache.pop(partition, None)  # unknown until the commit's reply
        try:
            seq = int(await self._commit(keys=keys, args=args))
        except ResponseError as exc:
            text = str(exc)
            if text.startswith("CONFLICT"):
                raise ConflictError(partition, expected_seq, int(text.split()[1])) from exc
            raise
        if self.cache_customers:
            customers = cache.customers if cache is not None else OrderedDict()
            for w in writes:
                if w.customer is not None:
                    customers[w.customer_id] = w.customer
                    customers.move_to_end(w.customer_id)
            self._cache[partition] = _PartitionCache(token, customers)
            self._evict()
        return seq

    def _evict(self) -> None:
        """Keep the caches within ``cache_customers``: drop the least recently committed
        customers of the largest partition cache first."""
        excess = sum(len(c.customers) for c in self._cache.values()) - self.cache_customers
        while excess > 0:
            victim = max(self._cache.values(), key=lambda c: len(c.customers)).customers
            for _ in range(min(excess, len(victim))):
                victim.popitem(last=False)
                excess -= 1

    async def population_between(self, partition: int,
                                 ranges: Sequence[tuple[str, float, float]]
                                 ) -> tuple[list[str], npt.NDArray[np.int64]]:
        """Customers of a partition whose population value lies in any of the closed ranges
        ``(kind, low, high)``, kind ``last`` (epoch ms), ``freq`` or ``mon`` (minor units), in
        one call: their ids and an int64 array of shape (N, 3) of (last purchase ms,
        frequency, monetary minor)."""
        k = self.keys(partition)
        kinds = {"last": 1, "freq": 2, "mon": 3}
        args: list[str | int] = []
        for kind, lo, hi in ranges:
            args += [kinds[kind], _bound(lo), _bound(hi)]
        if self.chunked:  # the other dimensions' values: from the customers' states
            return await self._with_values(partition, await self._pops(k, "range", args))
        ids, flat = await self._between(keys=[k.z_last, k.z_freq, k.z_mon], args=args)
        return list(ids), np.asarray(flat, dtype=np.int64).reshape(-1, 3)

    def _pops(self, k: PartitionKeys, op: str, args: Sequence[str | int],
              client: Any = None) -> Any:
        """``populations.lua``'s ``op`` on a partition's chunked populations (an awaitable)."""
        return self._populations(keys=[k.meta], args=[op, *k.chunk_bases, *args],
                                 client=client or self.client)

    async def _with_values(self, partition: int, ids: Sequence[str]
                           ) -> tuple[list[str], npt.NDArray[np.int64]]:
        """``ids`` that are scored, with their (last purchase ms, frequency, monetary minor)
        from their states (the chunked layout's values are the all-time ones: no window).
        A customer unreadable or without a purchase is left out."""
        found = await self.read_customers(partition, ids, others=True)
        out = [(cid, c.state) for cid, c in found.items()
               if c is not None and c.state.last_purchase_ms is not None]
        values = [(s.last_purchase_ms, s.frequency, s.monetary_minor) for _, s in out]
        return [cid for cid, _ in out], np.asarray(values, dtype=np.int64).reshape(-1, 3)

    async def due_all(self, partition: int, due_ms: int, page: int = 10_000) -> int:
        """Make every scored customer of a partition (its recency population) due by
        ``due_ms`` (an earlier due time stays), ``page`` customers per round trip; returns how
        many. For a re-score of everyone (a new segment rule table): the steps that follow
        evaluate them as due customers, at most ``max_due`` per step.

        Not atomic across pages: a customer added meanwhile is scored by its own event, one
        erased meanwhile is dropped when its due time comes (as any erased due customer), and
        running it again is harmless."""
        k = self.keys(partition)
        done = chunks = 0
        while True:
            last = False
            if self.chunked:  # ~page customers: chunks hold 32-127
                n = max(1, page // 64)
                ids, read = await self._pops(k, "page", [chunks, n])
                chunks, last = chunks + n, read < n
            else:
                ids = await self.client.zrange(k.z_last, done, done + page - 1)
                last = len(ids) < page
            if ids:
                await self.client.zadd(k.due, dict.fromkeys(ids, due_ms), lt=True)
            done += len(ids)
            if last:
                return done

    # --- population statistics ------------------------------------------------------------
    async def population(self, partitions: Iterable[int]) -> int:
        """Customers with at least one purchase, over ``partitions``."""
        return sum(n for n, *_ in await self._extremes(list(partitions)))

    async def _extremes(self, parts: list[int]
                        ) -> list[tuple[int, int | None, int | None, int | None]]:
        """Per partition: (customers, lowest last purchase ms, highest frequency, highest
        monetary minor), None where the population is empty; one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for p in parts:
            k = self.keys(p)
            if self.chunked:
                await self._pops(k, "stats", [], client=pipe)
                continue
            pipe.zcard(k.z_last)
            pipe.zrange(k.z_last, 0, 0, withscores=True)
            pipe.zrange(k.z_freq, -1, -1, withscores=True)
            pipe.zrange(k.z_mon, -1, -1, withscores=True)
        reply = await pipe.execute()
        if self.chunked:
            return [(int(n), *(None if x is None else int(x) for x in rest))
                    for n, *rest in reply]
        return [(int(reply[i]), *(int(r[0][1]) if r else None for r in reply[i + 1:i + 4]))
                for i in range(0, len(reply), 4)]

    async def order_statistics(self, partitions: Iterable[int], as_of_ms: int,
                               ranks: Sequence[int] | Callable[[int], Sequence[int]],
                               hint: OrderStatistics | None = None) -> OrderStatistics:
        """Order statistics of the population of all ``partitions`` at the given ranks
        (``ranks`` may be a function of the population size N, read in the same round trip as
        the value ranges; no ranks: only N is returned).

        Exact: a 33-ary search over values; each round is one pipelined round trip of a count
        script per partition (about 5 rounds for monetary values up to 10^8). ``hint``: earlier
        order statistics at as many ranks (the previous refresh's); the first round then probes
        around them (0, ±1, ±3, ... ±256, ±512, ±2048), after which a value that moved by up to
        256 is found in one more round (the result is the same exact one). Customers whose last
        purchase is after ``as_of_ms`` have recency 0.

        Raises
        ------
        ValueError
            When a rank is outside ``1..population``.
        """
        parts = list(partitions)
        keysets = [self.keys(p) for p in parts]
        extremes = await self._extremes(parts)
        n = sum(e[0] for e in extremes)
        if callable(ranks):
            ranks = ranks(n)
        if not ranks:
            return OrderStatistics(n, (), (), ())
        if any(not 1 <= r <= n for r in ranks):
            raise ValueError(f"ranks {list(ranks)} outside 1..{n}")
        first_last = min(e[1] for e in extremes if e[1] is not None)
        max_f = max((e[2] for e in extremes if e[2] is not None), default=0)
        max_m = max((e[3] for e in extremes if e[3] is not None), default=0)
        max_days = max(0, (as_of_ms - first_last) // MS_PER_DAY)

        # recency: largest m with #(recency >= m) >= k; #(recency >= m) = #(last <= as_of - m d)
        # frequency / monetary: smallest v with #(value <= v) >= k
        searches: list[tuple[str, int, int, int]] = []  # (kind, k, lo, hi)
        searches += [("r", k, 0, max_days) for k in ranks]
        searches += [("f", k, 0, max_f) for k in ranks]
        searches += [("m", k, 0, max_m) for k in ranks]
        lo = [s[2] for s in searches]
        hi = [s[3] for s in searches]
        kind_code = {"r": 1, "f": 2, "m": 3}
        centres = None
        if hint is not None and len(hint.recency_kth_largest) == len(ranks):
            centres = [*hint.recency_kth_largest, *hint.frequency_kth_smallest,
                       *hint.monetary_kth_smallest]
        while any(a < b for a, b in zip(lo, hi, strict=True)):
            # a 33-ary search: up to 32 probes per open search, one script call per partition
            probes: list[list[int]] = []
            args: list[int] = []
            for i, (kind, _, _, _) in enumerate(searches):
                width = hi[i] - lo[i]
                q = min(_PROBES, width)
                if centres is not None and width > 0:  # first round: around the hint
                    points = [centres[i] + d for d in _AROUND]
                    points = sorted({x for x in points if (lo[i] < x <= hi[i] if kind == "r"
                                                           else lo[i] <= x < hi[i])})
                elif kind == "r":  # the largest m with P(m): probes in (lo, hi]
                    points = sorted({hi[i] - (width * j) // (q + 1) for j in range(q)})
                else:  # the smallest v with P(v): probes in [lo, hi)
                    points = sorted({lo[i] + (width * j) // (q + 1) for j in range(1, q + 1)})
                probes.append(points)
                for x in points:
                    args += ([1, as_of_ms - x * MS_PER_DAY] if kind == "r"
                             else [kind_code[kind], x])
            pipe = self.client.pipeline(transaction=False)
            for ks in keysets:
                if self.chunked:
                    await self._pops(ks, "count", args, client=pipe)
                else:
                    await self._counts(keys=[ks.z_last, ks.z_freq, ks.z_mon], args=args,
                                       client=pipe)
            totals = [sum(column) for column in zip(*await pipe.execute(), strict=True)]
            at = 0
            for i, (kind, k, _, _) in enumerate(searches):
                for x in probes[i]:
                    holds = totals[at] >= k  # #(recency >= x) or #(value <= x) reaches k
                    at += 1
                    if kind == "r":
                        if holds:
                            lo[i] = max(lo[i], x)
                        else:
                            hi[i] = min(hi[i], x - 1)
                    elif holds:
                        hi[i] = min(hi[i], x)
                    else:
                        lo[i] = max(lo[i], x + 1)
            centres = None
        r = len(ranks)
        return OrderStatistics(n, tuple(lo[:r]), tuple(lo[r:2 * r]), tuple(lo[2 * r:]))

    # --- the outbox -------------------------------------------------------------------------
    async def outbox_claim(self, partition: int, publisher: str) -> None:
        """Make ``publisher`` (a random token) the partition's outbox publisher, whoever held
        it: reads and acks with any other token are refused from now on (FencedError).
        Called by the partition's new owner once it is assigned the partition."""
        await self.client.hset(self.keys(partition).meta, "pub", publisher)

    async def outbox_read(self, partition: int, count: int = 500, publisher: str | None = None
                          ) -> list[OutboxEntry]:
        """The oldest ``count`` outbox entries of a partition.

        With ``publisher`` (a token given to :meth:`outbox_claim`), only while it holds the
        partition (an absent claim, e.g. after Redis lost it, is taken by the reader); without
        it, unconditionally (replays, tools, tests).

        Raises
        ------
        FencedError
            Another publisher holds the partition; nothing was read.
        """
        k = self.keys(partition)
        if publisher is None:
            rows = await self.client.xrange(k.outbox, "-", "+", count=count)
        else:
            pipe = self.client.pipeline(transaction=True)  # the fence, then XRANGE: atomic
            await self._outbox_read(keys=[k.meta], args=[publisher], client=pipe)
            pipe.xrange(k.outbox, "-", "+", count=count)
            fence, rows = await pipe.execute(raise_on_error=False)
            if isinstance(fence, ResponseError):
                _raise_fenced(partition, fence)
                raise fence
        out = []
        for eid, fields in rows:
            kind, value = fields.get("k", "c"), fields["v"]
            out.append(OutboxEntry(eid, kind, value, value if kind == "t" else fields.get("key")))
        return out

    async def outbox_ack(self, partition: int, entry_ids: Sequence[str],
                         publisher: str | None = None) -> int:
        """Delete entries the broker acknowledged, ``entry_ids`` being the oldest entries in
        the order :meth:`outbox_read` returns them (ascending ids: only the first and the last
        are looked at): every entry up to the newest of them goes (those
        a ``forget`` deleted meanwhile are gone already; entries added since are newer).
        Returns how many were deleted. With ``publisher``, only while it holds the partition
        (as :meth:`outbox_read`), and only while the oldest of them is still the oldest
        entry: else (a forget deleted it, or the stream was lost and made again) nothing is
        deleted, and they are published again (duplicates, never a loss). Without it (tools,
        a replay that is the only reader), unconditionally.

        Raises
        ------
        FencedError
            Another publisher holds the partition; nothing was deleted (its new owner
            publishes the entries again).
        """
        if not entry_ids:
            return 0
        k = self.keys(partition)
        # (max/min over ~1,000 parsed ids per round: ~0.7% of the aligned worker's time)
        oldest, (ms, seq) = entry_ids[0], _stream_id(entry_ids[-1])
        keep = f"{ms}-{seq + 1}"  # XTRIM MINID deletes the entries with smaller ids
        if publisher is None:
            return int(await self.client.xtrim(k.outbox, minid=keep, approximate=False))
        try:
            return int(await self._outbox_ack(keys=[k.meta, k.outbox],
                                              args=[publisher, oldest, keep]))
        except ResponseError as exc:
            _raise_fenced(partition, exc)
            raise

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
        return {p: (_int(r[0], -1), opt_int(r[1])) for p, r in zip(parts, replies, strict=True)}

    async def clocks(self, partitions: Iterable[int]) -> list[PartitionClock]:
        """Each partition's highest event time and wall clock of its last applied event."""
        parts = list(partitions)
        pipe = self.client.pipeline(transaction=False)
        for p in parts:
            pipe.hmget(self.keys(p).meta, "wm", "seen")
        return [PartitionClock(p, opt_int(r[0]), opt_int(r[1]))
                for p, r in zip(parts, await pipe.execute(), strict=True)]

    async def as_of(self, partitions: Iterable[int]) -> int | None:
        """The latest as-of time any of ``partitions`` has scored at (epoch ms), or None."""
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.hget(self.keys(p).meta, "asof")
        times = [int(t) for t in await pipe.execute() if t]
        return max(times) if times else None

    async def thresholds(self, partition: int) -> str | None:
        """The partition's current thresholds (JSON), or None."""
        value = await self.client.hget(self.keys(partition).meta, "thr")
        return None if value is None else str(value)

    async def segment_counts(self, partitions: Iterable[int]) -> dict[str, int]:
        """Customers per stored segment, summed over partitions."""
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:  # bytes: a field written by hand need not be text
            pipe.execute_command("HGETALL", self.keys(p).segcount, **{NEVER_DECODE: []})
        totals: dict[str, int] = {}
        for reply in await pipe.execute():
            for raw, n in reply.items():
                seg = raw.decode("utf-8", "replace")
                totals[seg] = totals.get(seg, 0) + int(n)
        return {s: n for s, n in totals.items() if n}

    async def iter_customers(self, partition: int, count: int = 1000,
                             unreadable: list[tuple[str, str]] | None = None
                             ) -> AsyncIterator[list[StoredCustomer]]:
        """All customers of a partition, in pages (SCAN).

        Raises
        ------
        ValueError
            For a stored value that cannot be decoded (written by hand or by a bug), unless
            ``unreadable`` is given: such customers are then left out and listed there as
            ``(customer id, reason)``.
        """
        k = self.keys(partition)
        prefix_len = len(k.customer(""))
        cursor = 0
        while True:
            cursor, names = await self.client.scan(cursor, match=k.customer_pattern, count=count)
            if names:
                values = await _mget_bytes(self.client, names)
                nil = [n for n, v in zip(names, values, strict=True) if v is None]
                kinds = await self._not_strings(nil)
                page = []
                for name, v in zip(names, values, strict=True):
                    try:
                        if name in kinds:
                            raise ValueError(kinds[name])
                        page.append(decode(name[prefix_len:], v))
                    except ValueError as exc:
                        if unreadable is None:
                            raise
                        unreadable.append((name[prefix_len:], str(exc)))
                yield [c for c in page if c is not None]
            if cursor == 0:
                return

    async def _others(self, partition: int, ids: list[str], values: list[bytes | None]
                      ) -> dict[str, StoredCustomer | None]:
        """Customers read for a step of other customers' events (due, or re-scored), as
        ``_customer_or_none`` reads them; a key of another Redis type (``MGET`` answers nil,
        as for an erased customer) is logged the same way, found by one more round trip made
        only when some of them have no value."""
        out = {cid: _customer_or_none(cid, v, self.text_ids)
               for cid, v in zip(ids, values, strict=True)}
        k = self.keys(partition)
        absent = {k.customer(cid): cid for cid, v in zip(ids, values, strict=True) if v is None}
        for name, reason in (await self._not_strings(list(absent))).items():
            log.error("customer %r has an unreadable stored value, left as it is and not "
                      "re-scored: %s", absent[name], reason)
        return out

    async def _not_strings(self, names: list[str]) -> dict[str, str]:
        """Of keys that ``MGET`` answered nil for, those that exist with another Redis type
        (a hash or list written by hand): ``{key: reason}``. Keys deleted meanwhile are left
        out. Usually none of them exists (new customers): one ``EXISTS`` says so, where a
        ``TYPE`` per key cost a reply each (~2% of a worker's main thread on CDNOW)."""
        if not names or not await self.client.exists(*names):
            return {}
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.type(name)
        return {name: f"key {name!r}: a Redis {kind}, not a stored customer value"
                for name, kind in zip(names, await pipe.execute(), strict=True)
                if kind not in ("none", "string")}

    async def read_customer(self, partition: int, customer_id: str) -> StoredCustomer | None:
        """Full state of one customer, or None when unknown.

        Raises
        ------
        ValueError
            When its stored value cannot be decoded, or its key holds another Redis type.
        """
        found = (await self.read_customers(partition, [customer_id]))[customer_id]
        if found is None:
            name = self.keys(partition).customer(customer_id)
            if reason := (await self._not_strings([name])).get(name):
                raise ValueError(reason)
        return found

    async def forget(self, partition: int, customer_id: str, own: bool = True
                     ) -> tuple[bool, int]:
        """Erase a customer from a partition (state, population, due time, segment count, and
        its unpublished outbox entries) and queue a tombstone for it in the outbox: always when
        ``own`` (the customer's own partition), else only when it existed there or had entries
        (see ``forget.lua``); returns (whether it existed, outbox entries removed). Steps of
        the partition in flight re-read (compare-and-set)."""
        k = self.keys(partition)
        existed, removed, _ = await self._forget(
            keys=[k.meta, k.z_last, k.z_freq, k.z_mon, k.due, k.segcount, k.customer(customer_id),
                  k.outbox], args=[customer_id, "1" if own else "0", *k.chunk_bases])
        return bool(existed), int(removed)

    async def exchange_frontiers(self, own: Mapping[int, tuple[float, int]], partitions: int,
                                 now_ms: int, max_age_ms: int
                                 ) -> dict[int, tuple[float, int, int]]:
        """Publish what a worker reports of the partitions it owns (per partition: its
        event-time frontier in epoch ms, may be +-inf, and the records fetched of it; see
        ``stream.interleave.Report``), stamped with its wall clock ``now_ms``, and return the
        reports of the other partitions of ``range(partitions)`` made at most ``max_age_ms``
        before (or, clocks differing, after) ``now_ms``, each with the partition's last
        applied offset (-1: none; it moves while the owner applies a long step, when its
        report does not); an older report (a worker that died), or one that is not a
        worker's, is left out. One round trip (``state.keys.live_frontier_key``: values
        ``"<frontier> <stamp> <fetched>"``)."""
        key = live_frontier_key(self.namespace)
        others = [p for p in range(partitions) if p not in own]
        pipe = self.client.pipeline(transaction=False)
        if own:
            pipe.hset(key, mapping={str(p): f"{f!r} {now_ms} {n}" for p, (f, n) in own.items()})
        if not others:
            await pipe.execute()
            return {}
        pipe.hmget(key, [str(p) for p in others])
        for p in others:
            pipe.hget(self.keys(p).meta, "offset")
        replies = await pipe.execute()
        reports, offsets = replies[-1 - len(others)], replies[-len(others):]
        out: dict[int, tuple[float, int, int]] = {}
        for p, value, offset in zip(others, reports, offsets, strict=True):
            try:
                frontier, stamp, fetched = value.split()
                f = float(frontier)
                if abs(now_ms - int(stamp)) <= max_age_ms and not math.isnan(f):
                    out[p] = (f, int(fetched), _int(offset, -1))
            except (AttributeError, ValueError):  # absent, or not written by a worker
                continue
        return out

    async def load_model(self) -> str | None:
        """The latest clustering model snapshot (JSON text), or None."""
        value = await self.client.get(model_keys(self.namespace)[0])
        return None if value is None else str(value)

    async def sample_by_rank(self, partitions: Iterable[int], ranks: Sequence[int]
                             ) -> list[tuple[int, int, int]]:
        """The customers at the given ranks (0-based) of the population, ordered by partition,
        then by last purchase and id: ``(last purchase ms, frequency, monetary minor)`` each.
        Ranks beyond the population are skipped."""
        parts = list(partitions)
        starts, total = [], 0
        for n, *_ in await self._extremes(parts):
            starts.append(total)
            total += n
        local: dict[int, list[int]] = {}  # partition index -> ranks within it, in order
        for r in ranks:
            if 0 <= r < total:
                i = max(j for j, s0 in enumerate(starts) if s0 <= r)
                local.setdefault(i, []).append(r - starts[i])
        if self.chunked:
            found = {i: iter(await self._sample_chunked(parts[i], rs)) for i, rs in local.items()}
        else:
            pipe = self.client.pipeline(transaction=False)
            for i, rs in local.items():
                k = self.keys(parts[i])
                await self._sample(keys=[k.z_last, k.z_freq, k.z_mon], args=rs, client=pipe)
            found = {i: iter(reply) for i, reply in zip(local, await pipe.execute(), strict=True)}
        out = []
        for r in ranks:
            if 0 <= r < total:
                it = found[max(j for j, s0 in enumerate(starts) if s0 <= r)]
                if self.chunked:
                    if (row := next(it)) is not None:
                        out.append(row)
                    continue
                out.append((int(float(next(it))), int(float(next(it))), int(float(next(it)))))
        return out

    async def _sample_chunked(self, partition: int, ranks: Sequence[int]
                              ) -> list[tuple[int, int, int] | None]:
        """The chunked layout's part of :meth:`sample_by_rank` for one partition: the values of
        the customers at ``ranks`` (in their order), from their states (None: unreadable)."""
        order = sorted(set(ranks))
        flat = await self._pops(self.keys(partition), "ranks", order)
        at = dict(zip(order, flat[::2], strict=True))
        ids, values = await self._with_values(partition, list(at.values()))
        row = {cid: (int(v[0]), int(v[1]), int(v[2])) for cid, v in zip(ids, values, strict=True)}
        return [row.get(at[r]) for r in ranks]
