"""Population queries of the Redis store: the customers ranked by recency, frequency and
monetary value per partition, in either layout (``RFM_POPULATION_LAYOUT``): one sorted set per
population (``z:last``, ``z:freq``, ``z:mon``: ``between.lua``, ``counts.lua``, ``sample.lua``)
or chunks of at most 127 customers (``chunks.lua`` + ``populations.lua``). They serve the
quintile thresholds (exact order statistics), the customers a threshold refresh moves, the
trainer's sample, and a re-score of everyone.

:class:`PopulationQueries` is a part of :class:`state.store.RedisStore` (which inherits it);
the writes of the populations are in ``commit.lua`` and ``forget.lua``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from state.codec import StoredCustomer
from state.keys import PartitionKeys, layout_key
from state.rfm import MS_PER_DAY

LAYOUTS = ("sorted_sets", "chunked")



class LayoutError(ValueError):
    """A namespace written with one population layout, asked to work with the other."""



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


class PopulationQueries:
    """The population queries of a store (mixed into :class:`state.store.RedisStore`, which
    sets the attributes below)."""

    client: aioredis.Redis
    namespace: str
    population_layout: str  # as asked: sorted_sets, chunked or auto
    new_layout: str  # what check_layout records for a new namespace
    layout_partitions: int  # the partitions check_layout looks at when there is no record
    _chunked: bool | None  # None until check_layout resolved "auto"
    _populations: Any
    _between: Any
    _counts: Any
    _sample: Any

    def keys(self, partition: int) -> PartitionKeys:  # RedisStore's
        raise NotImplementedError

    async def read_customers(self, partition: int, customer_ids: Iterable[str],
                             others: bool = False) -> dict[str, StoredCustomer | None]:
        raise NotImplementedError  # RedisStore's

    @property
    def chunked(self) -> bool:
        """Whether the namespace's populations are chunked.

        Raises
        ------
        LayoutError
            With the layout ``auto``, before :meth:`check_layout` (or :meth:`layout`) read it.
        """
        if self._chunked is None:
            raise LayoutError(f"namespace {self.namespace!r}: its population layout is not "
                              f"read yet (check_layout)")
        return self._chunked

    async def layout(self) -> str:
        """The namespace's population layout, ``sorted_sets`` or ``chunked``: the one asked
        for, or with ``auto`` the one the namespace holds (:meth:`check_layout`, the first
        time; after that, no I/O).

        Raises
        ------
        LayoutError
            As :meth:`check_layout`.
        """
        if self._chunked is None:
            await self.check_layout(range(self.layout_partitions))
        return "chunked" if self.chunked else "sorted_sets"

    async def check_layout(self, partitions: Iterable[int]) -> None:
        """Hold the namespace to this store's population layout: the first store to ask
        records its own (``state.keys.layout_key``; with ``auto``, :attr:`new_layout`), or the
        one whose keys some of ``partitions`` already hold (a namespace written before layouts
        were recorded, or whose record was lost). With ``auto`` the store then uses the
        namespace's layout.

        Raises
        ------
        LayoutError
            When the namespace was written with the other layout (its populations would be
            read as empty and written twice over), or holds both; with ``auto``, when it is
            chunked and the store needs a window (:attr:`new_layout` ``sorted_sets``). The
            record binds from the first check, before any state: two workers of different
            layouts started at once on a new namespace would otherwise each write their own
            (no commit can check the record, which lives in partition 0's slot).
        """
        key, parts = layout_key(self.namespace), list(partitions)
        try:
            stored = await self.client.get(key)
        except ResponseError as exc:  # WRONGTYPE: not a string (set by hand)
            raise LayoutError(f"namespace {self.namespace!r}: its layout record {key!r} is "
                              f"not a string ({exc}): set it to the namespace's layout") from exc
        if stored is None:  # the data says which, if there is any
            found = await self._layouts_found(parts)
            await self.client.set(key, next(iter(found), self.new_layout), nx=True)
            stored = await self.client.get(key)
        if stored not in LAYOUTS:
            raise LayoutError(f"namespace {self.namespace!r}: its layout record "
                              f"{layout_key(self.namespace)!r} holds {stored!r}, none of "
                              f"{LAYOUTS} (set by hand?): set it to the namespace's layout")
        if self.population_layout == "auto":
            if stored == "chunked" and self.new_layout == "sorted_sets":
                raise LayoutError(
                    f"namespace {self.namespace!r} keeps its populations chunked, which keep no "
                    f"window (RFM_WINDOW_DAYS): replay into a new namespace to use a window")
            self._chunked = stored == "chunked"
        elif stored != self.population_layout:
            raise LayoutError(
                f"namespace {self.namespace!r} keeps its populations as {stored}, not "
                f"{self.population_layout} (RFM_POPULATION_LAYOUT): set it to {stored} or auto, "
                f"or replay into a new namespace with the layout wanted")

    async def _layouts_found(self, parts: list[int]) -> set[str]:
        """The layouts whose population keys some of ``parts`` hold.

        Raises
        ------
        LayoutError
            When they hold both.
        """
        found = {name for name, n in (
            ("sorted_sets", await self.client.exists(*(self.keys(p).z_last for p in parts))),
            ("chunked", await self.client.exists(
                *(self.keys(p).chunk_bases[0] + "i" for p in parts)))) if n}
        if len(found) > 1:
            raise LayoutError(f"namespace {self.namespace!r} holds populations in both "
                              f"layouts (some partitions' sorted sets, others' chunks): "
                              f"replay it into a new namespace")
        return found

    async def population_between(self, partition: int,
                                 ranges: Sequence[tuple[str, float, float]],
                                 read: dict[str, StoredCustomer | None] | None = None
                                 ) -> tuple[list[str], npt.NDArray[np.int64]]:
        """Customers of a partition whose population value lies in any of the closed ranges
        ``(kind, low, high)``, kind ``last`` (epoch ms), ``freq`` or ``mon`` (minor units), in
        one call: their ids and an int64 array of shape (N, 3) of (last purchase ms,
        frequency, monetary minor). ``read``: gets the customers read for their values (the
        chunked layout reads them; a caller that needs them then need not read them again)."""
        k = self.keys(partition)
        kinds = {"last": 1, "freq": 2, "mon": 3}
        args: list[str | int] = []
        for kind, lo, hi in ranges:
            args += [kinds[kind], _bound(lo), _bound(hi)]
        if await self.layout() == "chunked":  # the other dimensions' values: from the customers' states
            return await self._with_values(partition, await self._pops(k, "range", args), read)
        ids, flat = await self._between(keys=[k.z_last, k.z_freq, k.z_mon], args=args)
        return list(ids), np.asarray(flat, dtype=np.int64).reshape(-1, 3)

    def _pops(self, k: PartitionKeys, op: str, args: Sequence[str | int],
              client: Any = None) -> Any:
        """``populations.lua``'s ``op`` on a partition's chunked populations (an awaitable)."""
        return self._populations(keys=[k.meta], args=[op, *k.chunk_bases, *args],
                                 client=client or self.client)

    async def _with_values(self, partition: int, ids: Sequence[str],
                           read: dict[str, StoredCustomer | None] | None = None
                           ) -> tuple[list[str], npt.NDArray[np.int64]]:
        """``ids`` that are scored, with their (last purchase ms, frequency, monetary minor)
        from their states (the chunked layout's values are the all-time ones: no window).
        A customer unreadable or without a purchase is left out. ``read``: gets the
        customers read."""
        found = await self.read_customers(partition, ids, others=True)
        if read is not None:
            read.update(found)
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
        await self.layout()
        while True:
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
        await self.layout()  # (the callers that read self.chunked after this need not)
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
                    row = next(it)
                else:  # None: a rank an erasure removed since the size was read
                    values = (next(it), next(it), next(it))
                    row = None if None in values else (
                        int(float(values[0])), int(float(values[1])), int(float(values[2])))
                if row is not None:
                    out.append(row)
        return out

    async def _sample_chunked(self, partition: int, ranks: Sequence[int]
                              ) -> list[tuple[int, int, int] | None]:
        """The chunked layout's part of :meth:`sample_by_rank` for one partition: the values of
        the customers at ``ranks`` (in their order), from their states (None: unreadable)."""
        order = sorted(set(ranks))
        flat = await self._pops(self.keys(partition), "ranks", order)
        # a population that shrank since its size was read (an erasure) has fewer ranks
        at = dict(zip(order, flat[::2], strict=False))
        ids, values = await self._with_values(partition, list(at.values()))
        row = {cid: (int(v[0]), int(v[1]), int(v[2])) for cid, v in zip(ids, values, strict=True)}
        return [row.get(at[r]) if r in at else None for r in ranks]
