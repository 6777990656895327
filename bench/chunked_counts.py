"""What a threshold refresh's counts would cost over chunked populations: a design study for
the layout of docs/performance.md "Twelfth pass" (not used by the service). Prints figures;
asserts nothing (it says when the two answers differ).

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
"""

from __future__ import annotations

import argparse
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=250_000,
                    help="customers of the one partition (1M customers over 4 partitions)")
    ap.add_argument("--probes", type=int, default=128, help="upper bounds per dimension")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    main(args.customers, args.probes, args.repeat)
