"""The Redis store: RFM state, segment assignments, the outbox and model snapshots; its
population queries are in :mod:`state.populations` (which :class:`RedisStore` inherits).

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
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple

import msgpack
import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from state.codec import FORMAT, StoredCustomer, decode, encode, opt_int
from state.keys import PartitionKeys, live_frontier_key, model_keys
from state.populations import LAYOUTS, LayoutError, OrderStatistics, PopulationQueries

__all__ = ["ConflictError", "CustomerWrite", "FencedError", "LayoutError", "OrderStatistics",
           "OutboxEntry", "PartitionClock", "PartitionView", "RedisStore", "StoreError",
           "StoredCustomer", "UnreadableCustomers", "commit_payload", "commit_runs"]

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


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream entry id ``<ms>-<seq>`` as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def _opt(value: Any) -> str:
    return "" if value is None else str(value)


Population = tuple[int, int, int]
CHUNK_VALUE_MAX = 2**53 - 1  # the chunked populations rank larger values as this one
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
    the new one, an unchanged one neither, and the ZREM ids stay empty. Values above
    :data:`CHUNK_VALUE_MAX` count as it (a chunk's fence holds 16 digits; Redis's scores and
    Lua's numbers are exact up to 2^53 anyway). Else the sorted sets
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
                    was = None if before is None else min(before[k], CHUNK_VALUE_MAX)
                    now = None if pop is None else min(pop[k], CHUNK_VALUE_MAX)
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


def _int(value: str | None, default: int) -> int:
    return default if value in (None, "") else int(value)  # type: ignore[arg-type]


@dataclass
class _PartitionCache:
    """The customers a writer committed to one partition, valid while the partition's commit
    token is ``token``."""

    token: str
    customers: OrderedDict[str, StoredCustomer] = field(default_factory=OrderedDict)


class RedisStore(PopulationQueries):
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
        ``sorted_sets`` (one sorted set per population: ``z:last``, ``z:freq``, ``z:mon``),
        ``chunked`` (``state/lua/chunks.lua``: ~60 B per customer instead of ~310, for about
        twice the Redis time per write and several times per count; its commits need each
        write's ``previous_population``, so it cannot serve a window, whose values move
        without a write), or ``auto``: the layout the namespace holds, and for a new one
        ``chunked`` (``sorted_sets`` when ``window``). :meth:`check_layout` holds a namespace
        to one.
    partitions
        With ``auto``: the partitions whose keys tell a namespace's layout when it has no
        layout record (``check_layout``).
    window
        With ``auto``: the store's writes need a window (a new namespace gets ``sorted_sets``;
        a chunked one is refused).
    """

    def __init__(self, client: aioredis.Redis, namespace: str, cache_customers: int = 0,
                 write_format: int = FORMAT, population_layout: str = "sorted_sets",
                 partitions: int = 1, window: bool = False):
        if population_layout not in (*LAYOUTS, "auto"):
            raise ValueError(f"population layout {population_layout!r}: not one of "
                             f"{(*LAYOUTS, 'auto')}")
        self.client = client
        self.population_layout = population_layout
        self.layout_partitions = partitions
        if population_layout == "auto":
            self._chunked = None
            self.new_layout = "sorted_sets" if window else "chunked"
        else:
            self._chunked = population_layout == "chunked"
            self.new_layout = population_layout
        self.namespace = namespace
        self.cache_customers = cache_customers
        self.write_format = write_format
        self.text_ids = write_format < FORMAT
        self._cache: dict[int, _PartitionCache] = {}
        PartitionKeys(namespace, 0)  # validates the namespace
        chunks = _script_text("chunks.lua")
        self._commits = {False: client.register_script(_script_text("commit.lua")),
                         True: client.register_script(chunks + _script_text("commit.lua"))}
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
        chunked = await self.layout() == "chunked"
        token = secrets.token_hex(8)
        payload = commit_payload(
            {**{f: str(v) for f, v in meta.items()}, "tok": token},
            ((w.customer_id, _opt(w.due_ms), () if w.population_kept else w.population,
              None if w.customer is None else encode(w.customer, self.write_format),
              w.previous_segment or "",
              "" if w.customer is None else w.customer.segment or "",
              w.previous_population) for w in writes),
            k.customer(""), outbox, (str(model[0]), model[1]) if model else None,
            k.chunk_bases if chunked else None)
        args = [expected_seq, payload]
        keys = [k.meta, k.z_last, k.z_freq, k.z_mon, k.due, k.segcount, k.outbox, k.model,
                k.model_version]
        cache = self._cache.pop(partition, None)  # unknown until the commit's reply
        try:
            seq = int(await self._commits[chunked](keys=keys, args=args))
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
