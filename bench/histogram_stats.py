"""Order statistics from per-partition histograms: a design study for the count structure of
the chunked or binned population layouts (docs/performance.md, "Sixteenth pass"; not used by
the service). Prints figures; asserts nothing (it says when the answers differ).

    .venv/bin/python bench/histogram_stats.py [--customers 250000] [--partitions 4] [--repeat 10]

``--customers`` customers of ``bench/redis_memory.py`` (8 orders each on average), spread over
``--partitions`` partitions, are written into a fresh redis-server as today's population
sorted sets (``z:last``, ``z:freq``, ``z:mon`` of each partition, through the real key
layout), and each partition also gets one histogram hash per dimension: bin -> customers.

Bins: the day of the last purchase (epoch ms // 86,400,000), the frequency itself, and the
monetary value in minor units to 7 significant bits (:func:`mon_bin`: exact below 128, then
64 bins per power of two, each at most 1/64 of its values wide).

Then the quintile bounds of a threshold refresh (ranks ``ceil(j N / 5)``, j = 1..4, of all
three dimensions over all partitions) are found both ways, each timed over ``--repeat``
calls (median, wall clock over loopback, the way a worker pays for them):

``today``        ``RedisStore.order_statistics``: a 33-ary search, each round one
                 ``counts.lua`` call per partition (``ZCOUNT`` per probe); without a hint (a
                 worker's first refresh) and with the previous refresh's answer as the hint.
``histograms``   two round trips: every partition's three histograms (``HGETALL``), merged
                 and cumulated in Python to find the bin that holds each rank and the rank
                 within it; then the values of those bins in every partition (one
                 ``ZRANGEBYSCORE`` per bin and partition here; a binned layout reads the
                 bin's own keys instead), sorted, and the rank picked. Exact: the same
                 answer as today's search (compared).

It also times what keeping the histograms costs a commit: one script call doing, for each
of 1,000 customers, the ``HINCRBY -1`` / ``+1`` pairs of the dimensions whose bin changed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter
from itertools import accumulate
from pathlib import Path

import benchkit
import redis.asyncio as aioredis
from redis_memory import AS_OF, customer_states

from state.rfm import MS_PER_DAY
from state.store import OrderStatistics, RedisStore
from stream import localstack
from stream.scoring import quintile_ranks
from stream.timeline import utc

DIMS = ("l", "f", "m")  # last purchase (ms), frequency, monetary (minor units)


def mon_bin(v: int) -> int:
    """The monetary bin of ``v`` minor units (v >= 0): ``v`` itself below 128, else 64 bins per
    power of two: ``(bit_length - 7) * 64 + (the top 7 bits)``.

    >>> [mon_bin(v) for v in (0, 127, 128, 129, 130, 255, 256)]
    [0, 127, 128, 128, 129, 191, 192]
    """
    e = v.bit_length()
    return v if e <= 7 else (e - 7) * 64 + (v >> (e - 7))


def mon_bin_range(b: int) -> tuple[int, int]:
    """The closed range of values of monetary bin ``b`` (the inverse of :func:`mon_bin`).

    >>> mon_bin_range(5), mon_bin_range(128), mon_bin_range(192)
    ((5, 5), (128, 129), (256, 259))
    """
    if b < 128:
        return b, b
    shift, top = b // 64 - 1, b % 64 + 64
    return top << shift, ((top + 1) << shift) - 1


def bin_of(dim: str, v: int) -> int:
    return v // MS_PER_DAY if dim == "l" else v if dim == "f" else mon_bin(v)


def bin_range(dim: str, b: int) -> tuple[int, int]:
    if dim == "l":
        return b * MS_PER_DAY, (b + 1) * MS_PER_DAY - 1
    return (b, b) if dim == "f" else mon_bin_range(b)


async def populate(store: RedisStore, n: int, parts: int) -> None:
    """The population sorted sets and the histograms of ``n`` customers in ``parts``
    partitions."""
    hist = {(p, d): Counter() for p in range(parts) for d in DIMS}
    pipe = store.client.pipeline(transaction=False)
    for i, (cid, s) in enumerate(customer_states(n, uuid_ids=False)):
        p = i % parts
        k = store.keys(p)
        row = (s.last_purchase_ms or 0, s.frequency, s.monetary_minor)
        for d, key, v in zip(DIMS, (k.z_last, k.z_freq, k.z_mon), row, strict=True):
            pipe.zadd(key, {cid: v})
            hist[p, d][bin_of(d, v)] += 1
        if i % 3000 == 2999:
            await pipe.execute()
    await pipe.execute()
    for (p, d), counts in hist.items():
        await store.client.hset(store.keys(p).prefix + "h:" + d,
                                mapping={str(b): c for b, c in counts.items()})


async def from_histograms(store: RedisStore, parts: int, as_of_ms: int
                          ) -> tuple[OrderStatistics, int, int]:
    """The quintile order statistics from the histograms; also the histogram fields and the
    boundary values read."""
    keys = [store.keys(p) for p in range(parts)]
    pipe = store.client.pipeline(transaction=False)
    for k in keys:
        for d in DIMS:
            pipe.hgetall(k.prefix + "h:" + d)
    reply = await pipe.execute()
    fields = sum(len(h) for h in reply)
    merged = {d: Counter() for d in DIMS}
    for i, h in enumerate(reply):
        for b, c in h.items():
            merged[DIMS[i % 3]][int(b)] += int(c)
    n = sum(merged["l"].values())
    ranks = quintile_ranks(n)
    wanted: list[tuple[str, int, int]] = []  # (dim, bin, rank within the bin)
    for d in DIMS:
        bins = sorted(merged[d])
        below = [0, *accumulate(merged[d][b] for b in bins)]
        for k in ranks:
            j = next(j for j in range(len(bins)) if below[j + 1] >= k)
            wanted.append((d, bins[j], k - below[j]))
    zkey = {"l": "z_last", "f": "z_freq", "m": "z_mon"}
    pipe = store.client.pipeline(transaction=False)
    read = [(d, b, within) for d, b, within in wanted if bin_range(d, b)[0] < bin_range(d, b)[1]]
    for d, b, _ in read:  # a bin of one value needs no read
        lo, hi = bin_range(d, b)
        for k in keys:
            pipe.zrangebyscore(getattr(k, zkey[d]), lo, hi, withscores=True)
    reply = await pipe.execute()
    values_read = sum(len(r) for r in reply)
    found = {}
    for i, (d, b, within) in enumerate(read):
        values = sorted(int(s) for part in reply[i * parts:(i + 1) * parts] for _, s in part)
        found[d, b, within] = values[within - 1]
    picked = [found.get(w, bin_range(w[0], w[1])[0]) for w in wanted]
    last, f, m = picked[0:4], picked[4:8], picked[8:12]
    recency = tuple(max(0, (as_of_ms - x) // MS_PER_DAY) for x in last)
    return OrderStatistics(n, recency, tuple(f), tuple(m)), fields, values_read


HINCR_LUA = """
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], -1)
  redis.call('HINCRBY', KEYS[1], ARGV[i + 1], 1) end
return 0
"""


async def timed(call, repeat: int) -> tuple[float, object]:
    times, answer = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        answer = await call()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, answer


async def main(n: int, parts: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = localstack.start_redis(Path(tmp))
        client = aioredis.Redis(host=localstack.LOOPBACK, port=server.port, socket_timeout=600,
                                decode_responses=True)
        try:
            store = RedisStore(client, "bench")
            await populate(store, n, parts)
            as_of = AS_OF
            every = range(parts)
            cold_ms, truth = await timed(
                lambda: store.order_statistics(every, as_of, quintile_ranks), repeat)
            warm_ms, warm = await timed(
                lambda: store.order_statistics(every, as_of, quintile_ranks, hint=truth), repeat)
            hist_ms, (stats, fields, values) = await timed(
                lambda: from_histograms(store, parts, as_of), repeat)
            # what keeping them costs: 1,000 customers, each changing bin in all three
            # dimensions (an event usually changes two: its day and its frequency)
            hincr = store.client.register_script(HINCR_LUA)
            args = [x for i in range(3000) for x in (str(i % 700), str(i % 700 + 1))]
            incr_ms, _ = await timed(lambda: hincr(keys=["h:test"], args=args), repeat)
        finally:
            await client.aclose()
            server.stop()
    print(benchkit.machine())
    print(f"quintile bounds of {n:,} customers (bench/redis_memory.py, as-of {utc(AS_OF):%Y-%m-%d}) in "
          f"{parts} partitions; median of {repeat} calls:")
    for name, ms, answer in (("today, no hint", cold_ms, truth),
                             ("today, previous answer as hint", warm_ms, warm),
                             ("histograms", hist_ms, stats)):
        same = "same bounds" if answer == truth else f"BOUNDS DIFFER: {answer} vs {truth}"
        print(f"  {name:<32}{ms:>8.2f} ms  ({same})")
    print(f"  histograms read: {fields:,} fields over {parts * 3} hashes; boundary bins: "
          f"{values:,} values")
    print(f"  keeping them: 6,000 HINCRBY in one script call (1,000 customers changing bin in "
          f"three dimensions): {incr_ms:.2f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=250_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    asyncio.run(main(args.customers, args.partitions, args.repeat))
