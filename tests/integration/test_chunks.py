"""``state/lua/chunks.lua`` against a plain sorted list: random adds and removes (ties of
values, ids that are prefixes of others, splits and merges), then every query of the library
and the layout's invariants checked against the list, on a real redis-server."""

from __future__ import annotations

import itertools
import random

import pytest
import redis.asyncio as aioredis

from state.store import _script_text

CONSTANTS = "local PC_MAX, PC_SPLIT, PC_MERGE, PC_GMAX = 127, 64, 32, 64"
SMALL = (8, 4, 2, 3)  # the same rules on small chunks and groups: every path taken often
_ns = itertools.count()

DISPATCH = """
local base, op = KEYS[1], ARGV[1]
if op == 'add' then
  for i = 2, #ARGV, 2 do pc_add(base, tonumber(ARGV[i]), ARGV[i + 1]) end
  pc_flush_all()
  return 1
elseif op == 'remove' then
  local n = 0
  for i = 2, #ARGV, 2 do n = n + pc_remove(base, tonumber(ARGV[i]), ARGV[i + 1]) end
  pc_flush_all()
  return n
elseif op == 'apply' then  -- ARGV[2] removals, then additions, in one call (as commit.lua)
  local n, removed = tonumber(ARGV[2]), 0
  for i = 3, 2 + 2 * n, 2 do removed = removed + pc_remove(base, tonumber(ARGV[i]), ARGV[i + 1]) end
  for i = 3 + 2 * n, #ARGV, 2 do pc_add(base, tonumber(ARGV[i]), ARGV[i + 1]) end
  pc_flush_all()
  return removed
elseif op == 'count' then
  local out = {}
  for i = 2, #ARGV do out[#out + 1] = pc_count_le(base, tonumber(ARGV[i])) end
  return out
elseif op == 'range' then
  return pc_range(base, tonumber(ARGV[2]), tonumber(ARGV[3]))
elseif op == 'total' then
  return pc_total(base)
elseif op == 'ranks' then
  local ranks = {}
  for i = 2, #ARGV do ranks[#ranks + 1] = tonumber(ARGV[i]) end
  return pc_at_ranks(base, ranks)
end
"""


@pytest.fixture
async def client(stack):
    client = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
    yield client
    await client.aclose()


def library(client: aioredis.Redis, sizes: tuple[int, int, int, int] | None = None):
    """The library with a dispatcher of its operations; ``sizes``: other chunk and group
    sizes (PC_MAX, PC_SPLIT, PC_MERGE, PC_GMAX)."""
    text = _script_text("chunks.lua")
    assert CONSTANTS in text
    if sizes is not None:
        text = text.replace(CONSTANTS, CONSTANTS.split("=")[0] + "= " + ", ".join(map(str, sizes)))
    return client.register_script(text + DISPATCH)


def order(members: dict[str, int]) -> list[tuple[int, str]]:
    """The population in (value, id) order, ids by their bytes (Redis's member order)."""
    return sorted(((v, i) for i, v in members.items()), key=lambda p: (p[0], p[1].encode()))


def fence_key(member: tuple[int, str]) -> bytes:
    return f"{member[0]:016d}{member[1]}".encode()


async def layout(client: aioredis.Redis, base: str) -> list[tuple[str, list[tuple[int, str]]]]:
    fences = await client.zrangebylex(base + "i", "-", "+")
    return [(f, [(int(s), m) for m, s in
                 await client.zrange(base + "c:" + f, 0, -1, withscores=True)]) for f in fences]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sizes", [None, SMALL], ids=["default", "small"])
async def test_chunks_hold_the_population_in_order(client, sizes, seed):
    script = library(client, sizes)
    most, _, _, gmax = sizes or (127, 64, 32, 64)
    base = f"chunks{next(_ns)}:"
    rng = random.Random(seed)
    spread = [5, 50, 10**12][seed % 3]  # many ties, some, almost none
    ids = [f"c{k}" for k in range(700)] + [f"c{k}x" for k in range(100)] + ["", "é", "c"]
    pop: dict[str, int] = {}
    for step in range(40):
        adds, removes = {}, {}
        for cid in rng.sample(ids, rng.randrange(1, 120)):
            r = rng.random()
            if cid in pop and r < 0.8:
                removes[cid] = pop.pop(cid)
                if r < 0.4:  # a move
                    adds[cid] = rng.randrange(spread)
            elif cid not in pop:
                adds[cid] = rng.randrange(spread)
        # a customer that moves: removed at its old value, added at its new one; in one
        # call every other round (the writes of one call share what it read of the layout)
        gone = [x for cid, v in removes.items() for x in (v, cid)]
        new = [x for c, v in adds.items() for x in (v, c)]
        if step % 2:
            assert await script(keys=[base], args=["apply", len(removes), *gone, *new]) == \
                len(removes)
        else:
            if removes:
                assert await script(keys=[base], args=["remove", *gone]) == len(removes)
            if adds:
                await script(keys=[base], args=["add", *new])
        pop.update(adds)
        want = order(pop)
        chunks = await layout(client, base)
        # the layout: '' first, every chunk within its fence and the next, none too big,
        # only the first one empty, and together exactly the population in order
        assert chunks[0][0] == ""
        assert [m for _, members in chunks for m in members] == want
        for k, (fence, members) in enumerate(chunks):
            assert len(members) <= most
            assert members or k == 0
            if k:  # a lower bound of its members, above the previous chunk's
                assert fence_key(chunks[k - 1][1][-1]) < fence.encode() <= fence_key(members[0])
        assert await script(keys=[base], args=["total"]) == len(pop)
        sizes = await client.hgetall(base + "s")
        assert sizes == {f: str(len(m)) for f, m in chunks}
        # the groups: runs of consecutive chunks, each named by its first chunk's fence,
        # with their customers and chunks counted
        fences = [f for f, _ in chunks]
        groups = await client.zrangebylex(base + "g", "-", "+")
        assert groups[0] == "" and set(groups) <= set(fences)
        starts = [fences.index(g) for g in groups] + [len(fences)]
        gn, gc = await client.hgetall(base + "gn"), await client.hgetall(base + "gc")
        assert set(gn) == set(gc) == set(groups)
        for g, a, b in zip(groups, starts, starts[1:], strict=False):
            assert int(gc[g]) == b - a <= gmax
            assert int(gn[g]) == sum(len(m) for _, m in chunks[a:b])
        assert await script(keys=[base], args=["remove", 7, "absent"]) == 0
    # queries
    values = sorted(pop.values())
    probes = sorted({rng.randrange(-1, spread + 1) for _ in range(20)} | {0, values[0], values[-1]})
    counts = await script(keys=[base], args=["count", *probes])
    assert counts == [sum(v <= x for v in values) for x in probes]
    for _ in range(10):
        lo = rng.randrange(spread)
        hi = lo + rng.randrange(max(1, spread // 4))
        got = await script(keys=[base], args=["range", lo, hi])
        assert [(int(s), m) for m, s in zip(got[::2], got[1::2], strict=True)] == \
            [p for p in want if lo <= p[0] <= hi]
    ranks = sorted(rng.sample(range(len(want)), min(30, len(want))))
    got = await script(keys=[base], args=["ranks", *ranks])
    assert [(int(s), m) for m, s in zip(got[::2], got[1::2], strict=True)] == [want[r] for r in ranks]


async def test_chunks_split_and_merge_back(client):
    """Hand-worked: the 128th customer splits the first chunk at 64 (Redis converts a
    129th member to a skiplist, for good); removing 40 of the second chunk's 64 leaves 24
    (< 32), merged back into the first (64 + 24 <= 127)."""
    script = library(client)
    base = f"chunks{next(_ns)}:"
    await script(keys=[base], args=["add", *[x for k in range(128) for x in (k, f"c{k:03d}")]])
    chunks = await layout(client, base)
    assert [(f, len(m)) for f, m in chunks] == [("", 64), (f"{64:016d}c064", 64)]
    for f, _ in chunks:  # both still listpacks (Redis 6.2 calls them ziplists)
        assert await client.object("encoding", base + "c:" + f) in ("ziplist", "listpack")
    await script(keys=[base], args=["remove", *[x for k in range(64, 104) for x in (k, f"c{k:03d}")]])
    chunks = await layout(client, base)
    assert [(f, len(m)) for f, m in chunks] == [("", 88)]
    assert await client.exists(base + f"c:{64:016d}c064") == 0


async def test_more_chunks_and_groups_than_lua_unpacks_at_once(client):
    """Redis's Lua unpacks at most ~8,000 values in one call: a population of more chunks
    (500,000 customers in one partition at the real sizes; here 60,000 on the small sizes,
    ~10,000 chunks, 20,000 customers added by one call) must still be counted, ranked and
    written (sizes flushed) whole."""
    script = library(client, SMALL)
    base = f"chunks{next(_ns)}:"
    rng = random.Random(5)
    pop = {f"c{k}": rng.randrange(10**9) for k in range(60_000)}
    items = [x for cid, v in pop.items() for x in (v, cid)]
    await script(keys=[base], args=["add", *items[:40_000]])  # 20,000 customers at once
    for i in range(40_000, len(items), 2_000):
        await script(keys=[base], args=["add", *items[i:i + 2_000]])
    assert await client.zcard(base + "i") > 8_000
    assert await script(keys=[base], args=["total"]) == len(pop)
    sizes = await client.hgetall(base + "s")
    assert sum(map(int, sizes.values())) == len(pop) and len(sizes) == await client.zcard(
        base + "i")
    want = order(pop)
    values = [v for v, _ in want]
    probes = [values[0], values[len(values) // 3], values[-1] - 1, values[-1]]
    assert await script(keys=[base], args=["count", *probes]) == [
        sum(v <= x for v in values) for x in probes]
    ranks = [0, 1, len(want) // 2, len(want) - 2, len(want) - 1]
    got = await script(keys=[base], args=["ranks", *ranks])
    assert [(int(s), m) for m, s in zip(got[::2], got[1::2], strict=True)] == \
        [want[r] for r in ranks]
    await client.delete(*[k async for k in client.scan_iter(match=base + "*", count=10_000)])
