"""Redis memory per customer of candidate layouts, against the 500 bytes/customer target: a
design study of layouts the service does not use (yet), on ``bench/redis_memory.py``'s
customers (8 orders each on average). Prints figures; asserts nothing.

    .venv/bin/python bench/memory_layouts.py [--customers 200000] [--layouts today chunked ...]

Each layout is written into a fresh redis-server from ``stream.localstack`` (one partition's
keys; ``INFO memory`` ``used_memory`` after minus before, per customer):

``json``      the service's layout until format 3 (its population part): the customer value
              as JSON text (formats 1-2 of ``state.codec``) in a string per customer, three
              sorted sets (last purchase, frequency, monetary) of customer ids.
``format3``   the same with the value in MessagePack with ids as text (format 3: short ids
              as they are, long ones as a 13-character digest), until 2026-12-03.
``today``     the same with the value in format 4 (ids as 8-byte digests, orders as columns),
              as the service stores it now; ``bench/redis_memory.py`` measures the real
              thing, with every key.
``hashed``    ``today``'s values as fields of hashes of ~200 customers each (Redis's compact
              listpack/ziplist encoding, "Memory optimization" in the Redis docs), instead of
              a key per customer. Needs ``hash-max-ziplist-value`` (``-listpack-`` in Redis 7)
              above the largest value: 1024 here, set with ``CONFIG SET``.
``binned``    ``hashed`` with the populations as sets of customer ids per bin (day of the
              last purchase, frequency, 2% monetary bin) and one count hash per dimension,
              instead of three sorted sets. The counts locate the bin of each quintile
              bound; the bound within it, and the customers a threshold move re-scores, come
              from the members of the bins it crosses, read with their values (more reads
              per refresh than the sorted sets' range queries).

``chunked``   ``today``'s values (a key per customer, no Redis setting changed), with each
              population (last purchase, frequency, monetary) as sorted sets of at most
              ``CHUNK`` customers holding consecutive runs of the population in (value, id)
              order (kept in Redis's compact listpack/ziplist encoding by the default
              ``zset-max-ziplist-entries 128``), each dimension with an index sorted set
              (chunk -> lowest value) and a count hash (chunk -> size). Counts up to a bound
              stay exact: the sizes of the chunks wholly below it plus one ``ZCOUNT`` in the
              one chunk that straddles it. A worker would split a chunk that outgrows
              ``CHUNK`` (a B-tree of small sorted sets) and merge small neighbours; this study
              writes the chunks of the final population.

What each layout would cost the worker (encoding time, Redis calls, configuration) is not
measured here: docs/performance.md, "Tenth pass" and "Twelfth pass", says what is known.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import benchkit
import redis
from redis_memory import AS_OF, MS_PER_DAY, TARGET, customer_states

from state.codec import encode
from state.rfm import CustomerState, Limits
from state.store import StoredCustomer
from stream import localstack

LAYOUTS = ("json", "format3", "today", "hashed", "binned", "chunked")
CHUNK = 100  # customers per population chunk in the chunked layouts
PER_HASH = 200  # customers per hash in the hashed layouts
MONETARY_BIN = 1.02  # ratio between a monetary bin's bounds


def digest(text: str) -> bytes:
    """An id as 8 bytes (BLAKE2b-64): collisions ~n^2 / 2^65, negligible for 32 ids."""
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def customer(cid: str, s: CustomerState) -> StoredCustomer:
    """The benchmark's customer as the service stores it (a segment, cluster and scores)."""
    return StoredCustomer(cid, s, "Champions", 0, (5, 5, 5), s.last_purchase_ms)


VALUES: dict[str, Callable[[str, CustomerState], bytes]] = {
    "json": lambda cid, s: encode(customer(cid, s), 2),  # formats 1-2: JSON text
    "format3": lambda cid, s: encode(customer(cid, s), 3),
}
TEXT_IDS = ("json", "format3")  # layouts whose values keep ids as text


def write(r: redis.Redis, layout: str, customers: Iterator[tuple[str, CustomerState]],
          n: int) -> float:
    """Write the customers in ``layout``; returns the mean value length (bytes)."""
    value = VALUES.get(layout, lambda cid, s: encode(customer(cid, s)))
    hashes = max(1, n // PER_HASH)
    pipe = r.pipeline(transaction=False)
    length = 0
    population: list[tuple[str, int, int, int]] = []
    for i, (cid, s) in enumerate(customers):
        v = value(cid, s)
        length += len(v)
        last, f, m = s.last_purchase_ms or 0, s.frequency, s.monetary_minor
        if layout in ("json", "format3", "today", "chunked"):
            pipe.set(f"rfm:mem:{{p0}}:c:{cid}", v)
        else:
            h = int.from_bytes(digest(cid)[:4], "little") % hashes
            pipe.hset(f"rfm:mem:{{p0}}:h:{h}", cid, v)
        if layout == "binned":
            bins = {"r": last // MS_PER_DAY, "f": f,
                    "m": int(math.log(max(m, 1)) / math.log(MONETARY_BIN))}
            for dim, b in bins.items():
                pipe.sadd(f"rfm:mem:{{p0}}:{dim}:{b}", cid)
                pipe.hincrby(f"rfm:mem:{{p0}}:n:{dim}", b, 1)
        elif layout.startswith("chunked"):
            population.append((cid, last, f, m))
        else:
            pipe.zadd("rfm:mem:{p0}:z:last", {cid: last})
            pipe.zadd("rfm:mem:{p0}:z:freq", {cid: f})
            pipe.zadd("rfm:mem:{p0}:z:mon", {cid: m})
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    if population:
        write_chunks(r, population)
    return length / n


def write_chunks(r: redis.Redis, population: list[tuple[str, int, int, int]]) -> None:
    """The chunked populations of ``(id, last purchase ms, frequency, monetary minor)``."""
    pipe = r.pipeline(transaction=False)
    for dim, col in (("r", 1), ("f", 2), ("m", 3)):
        ordered = sorted(population, key=lambda row: (row[col], row[0]))
        for c in range(0, len(ordered), CHUNK):
            rows = ordered[c:c + CHUNK]
            name = f"{c // CHUNK:06d}"  # fixed width: chunks of one lowest value in order
            pipe.zadd(f"rfm:mem:{{p0}}:{dim}:{name}", {row[0]: row[col] for row in rows})
            pipe.zadd(f"rfm:mem:{{p0}}:{dim}:idx", {name: rows[0][col]})
            pipe.hset(f"rfm:mem:{{p0}}:{dim}:n", name, len(rows))
            if c % 20_000 == 0:
                pipe.execute()
    pipe.execute()


def measure(layout: str, n: int) -> tuple[float, float, str]:
    """(bytes per customer, mean value length, the customer keys' encoding) of ``layout``."""
    with tempfile.TemporaryDirectory() as tmp:
        server = localstack.start_redis(Path(tmp))
        r = redis.Redis(host=localstack.LOOPBACK, port=server.port, socket_timeout=600)
        try:
            r.config_set("hash-max-ziplist-value", 1024)
            r.config_set("hash-max-ziplist-entries", 512)
            before = int(r.info("memory")["used_memory"])
            limits = Limits(text_ids=layout in TEXT_IDS)
            length = write(r, layout, customer_states(n, uuid_ids=False, limits=limits), n)
            used = int(r.info("memory")["used_memory"]) - before
            key = next(r.scan_iter(match="rfm:mem:{p0}:[ch]:*", count=1000))
            encoding = r.object("encoding", key).decode()
            if layout.startswith("chunked"):
                chunk = r.object("encoding", "rfm:mem:{p0}:m:000000").decode()
                encoding += f"; population chunks {chunk}"
        finally:
            r.close()
            server.stop()
    return used / n, length, encoding


def main(n: int, layouts: list[str]) -> None:
    print(benchkit.machine())
    print(f"Redis memory of candidate layouts: {n:,} customers of bench/redis_memory.py "
          f"(8 orders each on average, ids pos-<n>), one partition, as-of {AS_OF} ms")
    for layout in layouts:
        per, length, encoding = measure(layout, n)
        verdict = "met" if per <= TARGET else "not met"
        print(f"  {layout:<16}{per:>8.1f} B per customer  (value {length:.0f} B, customer keys "
              f"{encoding}); target <= {TARGET}: {verdict}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=200_000)
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    args = ap.parse_args()
    main(args.customers, args.layouts)
