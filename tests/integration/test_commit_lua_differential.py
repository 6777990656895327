"""Differential fuzz: state/lua/commit.lua with state.store.commit_runs (the writes gathered
by command into variadic calls, in chunks; a MessagePack payload) against the reference
script (commit_lua_reference.lua: the script of dd2f4d9, one Redis call per command in the
order of the writes, the plain statement of what a commit does; a JSON payload). Both run the
same random commits against two namespaces of one redis-server; the replies, the errors and a
full dump of each namespace (every key's type, value, scores, hash fields including those at
0, stream entries without their ids, TTL) must be equal. ``DIFF_SEEDS`` (default 6) sets how
many random seeds run; hand cases cover nets of zero, one id written 3,000 times and
10,001-write commits."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import redis

from state.keys import PartitionKeys
from state.store import commit_payload
from stream import localstack

HERE = Path(__file__).parent
NEW = (HERE.parent.parent / "state" / "lua" / "commit.lua").read_text()
OLD = (HERE / "commit_lua_reference.lua").read_text()

SPECIAL = ["", " ", "c:1", "{p0}", "}{", "ä", "日本", "\u0000x", 'a"b', "\\", "*", "?", "[a]",
           "1", "1.0", "01", "-0", "nan", "inf", "x" * 300, "😀", "\n", "\t", "__index",
           "c", "c:", "meta", "due", "z:last"]
SEGMENTS = ["", "Champions", "At Risk", "Hibernating", "ä", "0", "-1", "seg:with:colons"]


@pytest.fixture(scope="module")
def r(tmp_path_factory):
    server = localstack.start_redis(tmp_path_factory.mktemp("redis"))
    client = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=False)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def keys_of(ns: str, p: int) -> list[str]:
    k = PartitionKeys(ns, p)
    return [k.meta, k.z_last, k.z_freq, k.z_mon, k.due, k.segcount, k.outbox, k.model,
            k.model_version]


def dump(r: redis.Redis, ns: str) -> dict:
    out = {}
    prefix = f"rfm:{ns}:".encode()
    keys = list(r.scan_iter(match=prefix + b"*", count=10_000))
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.ttl(key)
    meta = pipe.execute()
    pipe = r.pipeline(transaction=False)
    for i, key in enumerate(keys):
        t = meta[2 * i]
        if t == b"string":
            pipe.get(key)
        elif t == b"zset":
            pipe.zrange(key, 0, -1, withscores=True)
        elif t == b"hash":
            pipe.hgetall(key)
        elif t == b"stream":
            pipe.xrange(key)
        else:
            pipe.echo(t)
    values = pipe.execute()
    for i, key in enumerate(keys):
        t, v = meta[2 * i], values[i]
        if t == b"hash":
            v = sorted(v.items())
        elif t == b"stream":
            v = [fields for _, fields in v]
        out[key[len(prefix):]] = (t, v, meta[2 * i + 1])
    return out


def big(rng: random.Random) -> str:
    return rng.choice([str(rng.randint(0, 10**13)), str(rng.randint(-10**13, 10**13)),
                       str(2**53 + rng.randint(-3, 3)), str(2**63 - 1), str(10**20 + 1),
                       "0", str(rng.randint(0, 9))])


def gen_writes(rng: random.Random, n: int, pool: list[str], distinct: bool = False
               ) -> list[list]:
    fresh = [f"s{rng.randint(0, 10**9)}" for _ in range(3)]  # fields not in segcount yet
    # sometimes only two fresh names: moves A->B and B->A cancel out (a field at net 0)
    segments = fresh[:2] if rng.random() < 0.3 else SEGMENTS + fresh
    writes = []
    ids = iter(rng.sample(pool, n)) if distinct else None
    for _ in range(n):
        # distinct: long runs without a repeat (whole chunks), a rare duplicate forcing a flush
        cid = next(ids) if distinct and rng.random() > 0.0005 else rng.choice(pool)
        due = "" if rng.random() < 0.2 else big(rng)
        if rng.random() < 0.3:
            writes.append([cid, due, None, None])
            continue
        pop = False if rng.random() < 0.25 else [big(rng), big(rng), big(rng)]
        value = rng.choice(["v", "", json.dumps({"x": rng.random()}), "ä" * rng.randint(0, 5)])
        writes.append([cid, due, pop, value, rng.choice(segments), rng.choice(segments)])
    return writes


def gen_commit(rng: random.Random, size: int, mode: float | None = None) -> dict:
    mode = rng.random() if mode is None else mode
    if mode < 0.1:
        pool = [rng.choice(SPECIAL)]  # every write the same customer
    elif mode < 0.3:
        pool = SPECIAL + [f"d{i}" for i in range(rng.randint(1, 20))]  # many duplicates
    else:
        pool = SPECIAL + [f"c{rng.randint(0, 10**6)}:{i}" for i in range(max(size, 1) * 2)]
    return {
        "meta": {f: big(rng) for f in rng.sample(["offset", "wm", "asof", "seen", "thr"],
                                                  rng.randint(0, 5))} | {"tok": "t"},
        "writes": gen_writes(rng, size, pool, distinct=mode >= 0.5),
        "outbox": [[rng.choice("cdt"), json.dumps({"i": i}), rng.choice([None, "k", "ä"])]
                   for i in range(rng.choice([0, 0, 1, 5]))],
        "model": rng.choice([None, None, ["3", "{}"]]),
    }


def encoded(doc: dict, reference: bool, prefix: str) -> bytes:
    """A commit document as each script takes it: JSON with nulls and the writes one by one
    (the reference), or MessagePack with the writes gathered by command
    (:func:`state.store.commit_payload`; commit.lua)."""
    if reference:
        return json.dumps(doc).encode()
    rows = [(w[0], w[1], None, None, "", "", None) if w[3] is None
            else (w[0], w[1], None if w[2] is False else w[2], w[3], w[4], w[5], None)
            for w in doc["writes"]]
    return commit_payload(doc["meta"], rows, prefix, doc["outbox"],
                          tuple(doc["model"]) if doc["model"] else None)


def run(r, script, ns, p, seq, doc):
    k = PartitionKeys(ns, p)
    if script.script == OLD:
        args = [seq, encoded(doc, True, ""), k.customer("")]
    else:
        args = [seq, encoded(doc, False, k.customer(""))]
    try:
        return ("ok", script(keys=keys_of(ns, p), args=args))
    except redis.ResponseError as e:
        return ("err", str(e).replace(ns, "NS"))


SIZES = [0, 1, 2, 3, 10, 999, 1000, 1001, 1999, 2000, 2001, 3001, 5000, 10_000]


@pytest.mark.parametrize("seed", range(int(os.environ.get("DIFF_SEEDS", "6"))))
def test_new_commit_script_equals_reference(r, seed):
    rng = random.Random(seed)
    old, new = r.register_script(OLD), r.register_script(NEW)
    na, nb = f"old{seed}x{os.getpid()}", f"new{seed}x{os.getpid()}"
    p = rng.randint(0, 3)
    seq = -1
    for step in range(rng.randint(2, 5)):
        size = rng.choice(SIZES) if step else rng.choice([999, 1000, 1001, 2000, 2001, 4001, 10_000, 10_000])
        # the first commit: distinct ids in runs longer than a chunk
        payload = gen_commit(rng, size, None if step else 0.9)
        expected = seq if rng.random() > 0.1 else seq + rng.choice([-1, 1, 5])
        ra = run(r, old, na, p, expected, payload)
        rb = run(r, new, nb, p, expected, payload)
        assert ra == rb, (seed, step, size)
        # compare-and-set on the sequence (hand rule): the next one, or a conflict naming it
        assert ra == ("ok", seq + 1) if expected == seq else (
            ra[0] == "err" and ra[1].endswith(f"CONFLICT {seq}")), (ra, expected, seq)
        if ra[0] == "ok":
            seq = ra[1]
        da, db = dump(r, na), dump(r, nb)
        if da != db:
            diff = [(key, da.get(key), db.get(key)) for key in sorted(set(da) | set(db))
                    if da.get(key) != db.get(key)][:5]
            pytest.fail(f"seed {seed} step {step} size {size}: {diff!r}"[:4000])
    for ns in (na, nb):
        for key in list(r.scan_iter(match=f"rfm:{ns}:*".encode())):
            r.delete(key)


CASES = {
    "swap_to_net_zero": [["x", "", False, "v", "A", "B"], ["y", "", False, "v", "B", "A"]],
    "same_id_everywhere": [["s", str(d), None, None] if d % 3 else
                           ["s", str(d), [str(d)] * 3, "v", "A" if d % 2 else "B",
                            "B" if d % 2 else "A"] for d in range(3000, 0, -1)],
    "due_only_lt_then_full": [["a", "5", None, None], ["b", "", None, None],
                              ["a", "9", ["1", "2", "3"], "v", "", "X"], ["a", "7", None, None],
                              ["b", "1", None, None], ["a", "", False, "w", "X", ""]],
    "distinct_10001": [[f"c{i}", str(i), ["1", str(i), str(-i)], "v", "", "S"]
                       for i in range(10_001)],
    "due_only_10001": [[f"c{i}", str(10**20 + i), None, None] for i in range(10_001)],
    "unscored_10001": [[f"c{i}", "", False, "v", "S", ""] for i in range(10_001)],
    "empty": [],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_cases_equal_reference(r, name):
    old, new = r.register_script(OLD), r.register_script(NEW)
    na, nb = f"hold{name}x{os.getpid()}", f"hnew{name}x{os.getpid()}"
    pre = {"meta": {}, "writes": [["a", "6", None, None], ["c5", "3", None, None]],
           "outbox": [], "model": None}
    payload = {"meta": {"offset": "1"}, "writes": CASES[name], "outbox": [], "model": None}
    for script, ns in ((old, na), (new, nb)):
        assert run(r, script, ns, 0, -1, pre) == ("ok", 0)
    assert run(r, old, na, 0, 0, payload) == run(r, new, nb, 0, 0, payload) == ("ok", 1)
    conflict = run(r, new, nb, 0, 0, payload)  # seq is 1 now
    assert conflict[0] == "err" and conflict[1].endswith("CONFLICT 1"), conflict
    assert run(r, old, na, 0, 0, payload) == conflict
    assert dump(r, na) == dump(r, nb)
