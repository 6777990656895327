"""What a threshold refresh's counts and a commit's population writes would cost over chunked
populations: a design study for the layout of docs/performance.md "Twelfth pass" (not used by
the service; "Fifteenth pass" and "Eighteenth pass"). Prints figures; asserts nothing (it says
when the answers differ). About 1-2 minutes.

    .venv/bin/python bench/chunked_counts.py [--customers 250000] [--probes 128] [--repeat 20]

One partition of ``--customers`` customers of ``bench/redis_memory.py`` (8 orders each on
average) is written into a fresh redis-server twice: as today's three population sorted
sets, and as ``bench/memory_layouts.py``'s chunks (sorted sets of at most ``CHUNK``
customers, consecutive in (value, id) order; per dimension an index sorted set of chunk
number -> lowest value and a hash of chunk number -> size). Then one call of each count
script answers the same probes, as a round of the 33-ary search of
``RedisStore.order_statistics`` sends (``--probes`` upper bounds per dimension, spread over
each dimension's range), and the median time of ``--repeat`` calls is printed:

``sorted sets``  today's ``state/lua/counts.lua``: one ``ZCOUNT`` per probe (a skiplist's
                 rank: O(log n)).
``chunks``       a ``ZCOUNT`` needs the sizes of every chunk below the probe: the script
                 reads each probed dimension's index and sizes (O(chunks)), cumulates them,
                 and per probe finds the last chunk whose lowest value is <= the probe
                 (binary search) and adds one ``ZCOUNT`` inside it.
``chunks, cumulated once``  the same with the cumulated sizes kept in one string per
                 dimension (MessagePack), as a refresh could build once and use for its ~5
                 rounds: the call reads and unpacks that string instead.
``chunks.lua``   the population library the service would use (``state/lua/chunks.lua``:
                 chunks of at most 128 with a second level of groups of at most 64 chunks,
                 built by adding the customers in random order, so chunks are split as a
                 live population's are): per probe, the customers of the groups before the
                 probe's (one read per call), ``ZCARD`` of the chunks before it in its group,
                 one ``ZCOUNT``. Also printed: its Redis memory per customer (three
                 dimensions, all its keys), and what moving 1,000 customers costs it (as one
                 commit of 1,000 purchases would: remove at the old value, add at the new
                 one, per dimension) against today's variadic ``ZADD`` of the same moves.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from itertools import accumulate
from pathlib import Path

import benchkit
import msgpack
import redis
from memory_layouts import CHUNK, write_chunks
from redis_memory import AS_OF, customer_states

from state.store import _script_text
from stream import localstack

COUNTS_LUA = (Path(__file__).resolve().parent.parent / "state" / "lua" / "counts.lua").read_text()

# KEYS: the three indexes, then the three size hashes; ARGV[1] the chunk key prefix (chunk
# key: prefix .. dimension .. ':' .. number), ARGV[2] '1' to read the cumulated strings
# (KEYS[7..9]) instead, then pairs of kind (1 last, 2 freq, 3 mon), upper bound.
CHUNKS_LUA = """
local dims = {'r', 'f', 'm'}
local loaded = {}
local function load(k)
  if loaded[k] then return loaded[k] end
  local names, lows, cum = {}, {}, {}
  if ARGV[2] == '1' then
    local t = cmsgpack.unpack(redis.call('GET', KEYS[6 + k]))
    names, lows, cum = t[1], t[2], t[3]
  else
    local idx = redis.call('ZRANGE', KEYS[k], 0, -1, 'WITHSCORES')
    for i = 1, #idx, 2 do names[#names + 1] = idx[i]; lows[#lows + 1] = tonumber(idx[i + 1]) end
    local total = 0
    for i = 1, #names, 4000 do
      local sizes = redis.call('HMGET', KEYS[3 + k], unpack(names, i, math.min(i + 3999, #names)))
      for _, s in ipairs(sizes) do cum[#cum + 1] = total; total = total + tonumber(s) end
    end
  end
  loaded[k] = {names, lows, cum}
  return loaded[k]
end
local out = {}
for a = 3, #ARGV, 2 do
  local k, x = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local t = load(k)
  local names, lows, cum = t[1], t[2], t[3]
  local lo, hi = 1, #lows  -- the last chunk whose lowest value is <= x
  if #lows == 0 or lows[1] > x then
    out[#out + 1] = 0
  else
    while lo < hi do
      local mid = math.floor((lo + hi + 1) / 2)
      if lows[mid] <= x then lo = mid else hi = mid - 1 end
    end
    out[#out + 1] = cum[lo] + redis.call('ZCOUNT', ARGV[1] .. dims[k] .. ':' .. names[lo],
                                         '-inf', ARGV[a + 1])
  end
end
return out
"""


# KEYS: the three populations' key prefixes. ARGV[1] 'add' | 'move', then:
# add: id, last, freq, mon, ...; move: id, old last, old freq, old mon, new ..., ...
# (the counts are the service's: populations.lua, COUNT_LUA)
LIBRARY_LUA = _script_text("chunks.lua") + """
local op = ARGV[1]
if op == 'add' then
  for i = 2, #ARGV, 4 do
    for k = 1, 3 do pc_add(KEYS[k], tonumber(ARGV[i + k]), ARGV[i]) end
  end
  pc_flush_all()
  return 1
elseif op == 'move' then
  for i = 2, #ARGV, 7 do
    for k = 1, 3 do
      pc_remove(KEYS[k], tonumber(ARGV[i + k]), ARGV[i])
      pc_add(KEYS[k], tonumber(ARGV[i + 3 + k]), ARGV[i])
    end
  end
  pc_flush_all()
  return 1
end
"""
LIB_KEYS = ["lib:{p0}:r:", "lib:{p0}:f:", "lib:{p0}:m:"]
COUNT_LUA = _script_text("chunks.lua") + _script_text("populations.lua")


def build_library(r: redis.Redis, population: list[tuple[str, int, int, int]]) -> tuple[float, float]:
    """The population in chunks.lua's layout, customers added in random order; returns its
    Redis memory per customer (bytes) and the build time (s)."""
    lib = r.register_script(LIBRARY_LUA)
    rows = population[:]
    random.Random(7).shuffle(rows)
    before = r.info("memory")["used_memory"]
    t = time.perf_counter()
    for i in range(0, len(rows), 1000):
        lib(keys=LIB_KEYS, args=["add", *[x for row in rows[i:i + 1000] for x in row]])
    built = time.perf_counter() - t
    return (r.info("memory")["used_memory"] - before) / len(rows), built


def moves(population: list[tuple[str, int, int, int]], n: int) -> list[tuple]:
    """``n`` customers that purchase again: last purchase later, one more order, more money."""
    rng = random.Random(11)
    return [(cid, last, f, m, last + rng.randrange(1, 30) * 86_400_000, f + 1,
             m + rng.randrange(100, 20_000)) for cid, last, f, m in rng.sample(population, n)]


def populate(r: redis.Redis, n: int) -> list[tuple[str, int, int, int]]:
    """Today's sorted sets and the chunks of ``n`` customers; their (id, last, f, m)."""
    population = [(cid, s.last_purchase_ms or 0, s.frequency, s.monetary_minor)
                  for cid, s in customer_states(n, uuid_ids=False)]
    pipe = r.pipeline(transaction=False)
    for i, (cid, last, f, m) in enumerate(population):
        pipe.zadd("z:last", {cid: last})
        pipe.zadd("z:freq", {cid: f})
        pipe.zadd("z:mon", {cid: m})
        if i % 3000 == 2999:
            pipe.execute()
    pipe.execute()
    write_chunks(r, population)
    return population


def cumulate(r: redis.Redis) -> None:
    """The cumulated strings: per dimension [chunk numbers, lowest values, sizes below]."""
    for dim in "rfm":
        idx = r.zrange(f"rfm:mem:{{p0}}:{dim}:idx", 0, -1, withscores=True)
        names = [name.decode() for name, _ in idx]
        sizes = [int(s) for s in r.hmget(f"rfm:mem:{{p0}}:{dim}:n", names)]
        cum = [0, *accumulate(sizes)][:-1]
        r.set(f"cum:{dim}", msgpack.packb([names, [int(v) for _, v in idx], cum]))


def probes(population: list[tuple[str, int, int, int]], per_dim: int) -> list[int]:
    """``per_dim`` upper bounds per dimension, evenly over its range: (kind, bound) pairs."""
    args: list[int] = []
    for kind, col in ((1, 1), (2, 2), (3, 3)):
        values = [row[col] for row in population]
        lo, hi = min(values), max(values)
        args += [x for j in range(per_dim) for x in (kind, lo + (hi - lo) * j // per_dim)]
    return args


def hinted_probes(population: list[tuple[str, int, int, int]]) -> list[int]:
    """The first round of a refresh with a hint (``RedisStore.order_statistics``): around each
    dimension's quintile bounds, the offsets ``_AROUND`` (in days for recency: here in the
    stored milliseconds)."""
    from state.populations import _AROUND
    args: list[int] = []
    for kind, col, unit in ((1, 1, 86_400_000), (2, 2, 1), (3, 3, 1)):
        values = sorted(row[col] for row in population)
        for q in (1, 2, 3, 4):
            centre = values[len(values) * q // 5]
            args += [x for d in _AROUND for x in (kind, max(0, centre + d * unit))]
    return args


def timed(call, repeat: int) -> tuple[float, list[int]]:
    times, answer = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        answer = call()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, [int(x) for x in answer or ()]


def main(n: int, per_dim: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = localstack.start_redis(Path(tmp))
        r = redis.Redis(host=localstack.LOOPBACK, port=server.port, socket_timeout=600)
        try:
            population = populate(r, n)
            cumulate(r)
            chunks = r.hlen("rfm:mem:{p0}:r:n")
            args = probes(population, per_dim)
            counts = r.register_script(COUNTS_LUA)
            chunked = r.register_script(CHUNKS_LUA)
            idx = [f"rfm:mem:{{p0}}:{d}:idx" for d in "rfm"]
            sizes = [f"rfm:mem:{{p0}}:{d}:n" for d in "rfm"]
            cum = [f"cum:{d}" for d in "rfm"]
            rows = [
                ("sorted sets", timed(lambda: counts(keys=["z:last", "z:freq", "z:mon"],
                                                     args=args), repeat)),
                ("chunks", timed(lambda: chunked(keys=idx + sizes + cum,
                                                 args=["rfm:mem:{p0}:", "0", *args]), repeat)),
                ("chunks, cumulated once", timed(lambda: chunked(
                    keys=idx + sizes + cum, args=["rfm:mem:{p0}:", "1", *args]), repeat)),
            ]
            build = timed(lambda: cumulate(r), max(3, repeat // 4))[0]
            per_customer, built = build_library(r, population)
            lib = r.register_script(LIBRARY_LUA)
            counts_lib = r.register_script(COUNT_LUA)
            rows.append(("chunks.lua", timed(lambda: counts_lib(keys=["lib:{p0}:meta"],
                                                              args=["count", *LIB_KEYS, *args]),
                                             repeat)))
            near = hinted_probes(population)
            hinted = [(name, timed(call, repeat)) for name, call in (
                ("sorted sets", lambda: counts(keys=["z:last", "z:freq", "z:mon"], args=near)),
                ("chunks.lua", lambda: counts_lib(keys=["lib:{p0}:meta"],
                                                 args=["count", *LIB_KEYS, *near])))]
            groups = [r.zcard(k + "g") for k in LIB_KEYS]
            lib_chunks = [r.zcard(k + "i") for k in LIB_KEYS]
            # 1,000 writes that move customers, as one commit would: chunks.lua, then the same
            # moves as today's ZADDs (a customer's new values replace its old ones)
            batch = moves(population, 1000)
            t = time.perf_counter()
            lib(keys=LIB_KEYS, args=["move", *[x for row in batch for x in row]])
            move_lib = time.perf_counter() - t
            # today's commit.lua: one variadic ZADD per population (new scores replace old ones)
            zadd = r.register_script(
                "for k = 1, 3 do redis.call('ZADD', KEYS[k], unpack(ARGV, (k - 1) * "
                "(#ARGV / 3) + 1, k * (#ARGV / 3))) end return 1")
            zargs = [x for col in (4, 5, 6) for row in batch for x in (row[col], row[0])]
            t = time.perf_counter()
            zadd(keys=["z:last", "z:freq", "z:mon"], args=zargs)
            move_zadd = time.perf_counter() - t
        finally:
            r.close()
            server.stop()
    print(benchkit.machine())
    print(f"counts over one partition of {n:,} customers (bench/redis_memory.py, as-of {AS_OF}), "
          f"{chunks:,} chunks of at most {CHUNK} per dimension; one call answering "
          f"{len(args) // 2} probes ({per_dim} per dimension), median of {repeat}:")
    truth = rows[0][1][1]
    for name, (ms, answer) in rows:
        same = "same counts" if answer == truth else "COUNTS DIFFER from the sorted sets'"
        print(f"  {name:<24}{ms:>8.2f} ms per call  ({same})")
    print(f"  building the cumulated strings (three dimensions, from Python): {build:.1f} ms")
    print(f"the first round of a refresh with a hint: {len(near) // 2} probes around the quintile "
          "bounds (state.store._AROUND):")
    for name, (ms, answer) in hinted:
        same = "same counts" if answer == hinted[0][1][1] else "COUNTS DIFFER from the sorted sets'"
        print(f"  {name:<24}{ms:>8.2f} ms per call  ({same})")
    print(f"chunks.lua: {per_customer:.1f} B of Redis memory per customer (three dimensions: "
          f"chunks, indexes, groups, counts), {lib_chunks} chunks and {groups} groups per "
          f"dimension (r, f, m), built in {built:.1f} s")
    print(f"  1,000 customers moved (remove + add, three dimensions): chunks.lua "
          f"{move_lib * 1000:.1f} ms, today's ZADDs (commit.lua's variadic ones) "
          f"{move_zadd * 1000:.1f} ms (one script call each)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=250_000,
                    help="customers of the one partition (1M customers over 4 partitions)")
    ap.add_argument("--probes", type=int, default=128, help="upper bounds per dimension")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    main(args.customers, args.probes, args.repeat)
