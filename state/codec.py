"""How one customer is stored: one Redis string per customer (``rfm:<ns>:{p<N>}:c:<id>``)
holding a compact MessagePack array, read with one ``GET`` (or ``MGET`` of a page, without
the client's text decoding) and decoded with one ``msgpack.unpackb``:

``[3, seg, cl, f, buy, ref, last, first, ev, o, w, sc, chg, hc]``

``3``                  format version (formats 1 and 2, the same array as JSON text, are still
                       read: converted when decoded, rewritten as 3 by the next write; format 1
                       had full ids and order times in ms)
``seg`` ``cl``         the segment and cluster id last published (nil: none)
``f`` ``buy`` ``ref``  frequency, purchases and refunds (minor units), all-time
``last`` ``first``     last and first purchase (epoch ms, nil: none)
``ev``                 recent event ids (``state.rfm.id_key`` form), newest first
``o``                  recent orders ``[[order id, bought, refunded, first day], ...]``, newest
                       first (id in ``id_key`` form, day since the epoch)
``w``                  window buckets ``[[index, orders, purchases, refunds], ...]``
``sc``                 the R, F, M scores at the last evaluation as one number, e.g. ``541``
``chg``                as-of time (epoch ms) of the last published change
``hc``                 cause of a change the flapping guard holds back, until it is published

One value instead of a hash of fields: a step reads and writes whole customers, and a single
string costs less memory and CPU (one parse, no per-field encoding) than a hash. MessagePack
instead of JSON: integers take 1-9 bytes instead of their digits and strings need no quotes,
so a customer with 8 orders takes ~290 bytes instead of ~414 (``bench/redis_memory.py``).
A value is told apart by its first byte: MessagePack's 14-element array is ``0x9e``, anything
else is read as JSON (formats 1-2). Releases before format 3 read JSON only: ``encode`` still
writes format 2 when asked (``RFM_STATE_FORMAT=2``, README "Upgrading").
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack
import orjson

from state.rfm import MS_PER_DAY, Bucket, CustomerState, Order, id_key

FORMAT = 3
MSGPACK_ARRAY = b"\x9e"  # the first byte of a format-3 value: a 14-element array


class StoredCustomer(NamedTuple):
    """A customer as stored: RFM state and what was last published for it.

    ``scores``: (R, F, M) at the last evaluation (an event or a due time), or None;
    ``changed_ms``: as-of time of the last published change (the flapping guard's clock), or
    None; ``held_cause``: the cause of a change the flapping guard holds back, or None.
    """

    customer_id: str
    state: CustomerState
    segment: str | None = None
    cluster: int | None = None
    scores: tuple[int, int, int] | None = None
    changed_ms: int | None = None
    held_cause: str | None = None


def opt_int(value: str | None) -> int | None:
    """An integer field, or None when absent or empty."""
    return None if value in (None, "") else int(value)  # type: ignore[arg-type]


def encode(c: StoredCustomer, fmt: int = FORMAT) -> bytes:
    """The stored value of a customer (see the module docstring) in format ``fmt``: 3, or 2
    (JSON text: what releases before format 3 read, for a rolling upgrade from them).

    Raises
    ------
    ValueError
        When ``fmt`` is neither 2 nor 3.
    """
    s, sc = c.state, c.scores
    fields = [fmt, c.segment, c.cluster, s.frequency, s.purchases_minor, s.refunds_minor,
              s.last_purchase_ms, s.first_purchase_ms, s.recent_event_ids, s.orders, s.buckets,
              None if sc is None else sc[0] * 100 + sc[1] * 10 + sc[2], c.changed_ms,
              c.held_cause]
    if fmt == FORMAT:  # raw strings: the formats Redis's Lua cmsgpack reads (forget.lua)
        return msgpack.packb(fields, use_bin_type=False)
    if fmt == 2:  # orjson writes named tuples only as plain tuples
        fields[9:11] = list(map(tuple, s.orders)), list(map(tuple, s.buckets))
        return orjson.dumps(fields)
    raise ValueError(f"stored format {fmt!r}: 2 or {FORMAT}")


_INT, _OPT_INT, _OPT_STR = {int}, {int, type(None)}, {str, type(None)}  # int: not bool
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last time a datetime can hold
MAX_MINOR = 2**63 - 1  # what an int64 column (the export) holds


def _typed(seg: object, cl: object, f: object, buy: object, ref: object, last: object,
           first: object, ev: object, orders: object, buckets: object, sc: object,
           chg: object, hc: object) -> bool:
    """Whether decoded fields have their types (see the module docstring) and ranges (counts
    and amounts in 0..2^63-1, times in 0..:data:`MAX_MS`), so that a value
    written by hand or by a bug fails here, as malformed, and not later in a step of other
    customers (a due re-score reads all but ``ev`` and ``o``; those two are read only by the
    customer's own events, whose failure stays theirs: checking their items too would double
    the cost of a decode)."""
    return ({type(f), type(buy), type(ref)} <= _INT
            and {type(cl), type(last), type(first), type(sc), type(chg)} <= _OPT_INT
            and {type(seg), type(hc)} <= _OPT_STR
            and type(ev) is list and type(orders) is list and type(buckets) is list
            and all(type(b) is list and len(b) == 4 and set(map(type, b)) <= _INT
                    and all(0 <= x <= MAX_MINOR for x in b) for b in buckets)
            and 0 <= f <= MAX_MINOR and 0 <= buy <= MAX_MINOR and 0 <= ref <= MAX_MINOR
            and all(t is None or 0 <= t <= MAX_MS for t in (last, first, chg)))


def decode(customer_id: str, value: bytes | str | None) -> StoredCustomer | None:
    """A customer from its stored value (format 3, or the JSON formats 1-2); None when there
    is none.

    Raises
    ------
    ValueError
        When the value is empty, malformed or of an unknown format version.
    """
    if value is None:
        return None
    if not value:
        raise ValueError(f"customer {customer_id!r}: an empty stored value")
    try:
        if isinstance(value, str) or value[:1] != MSGPACK_ARRAY:  # JSON: formats 1 and 2
            fields = orjson.loads(value)
        else:
            fields = msgpack.unpackb(value)
        (fmt, seg, cl, f, buy, ref, last, first, ev, orders, buckets, sc, chg, hc) = fields
        if not _typed(seg, cl, f, buy, ref, last, first, ev, orders, buckets, sc, chg, hc):
            raise TypeError("a field of the wrong type or out of range")
        if fmt == 1:  # full ids, order times in ms
            ev = [id_key(e) for e in ev]
            orders = [(id_key(o), b, r, t // MS_PER_DAY) for o, b, r, t in orders]
        elif fmt not in (2, FORMAT):
            raise ValueError(f"stored format {fmt!r}, expected {FORMAT}")
        state = CustomerState(f, buy, ref, last, first, tuple(ev),
                              tuple(map(Order._make, orders)), tuple(map(Bucket._make, buckets)))
        scores = None if sc is None else (sc // 100, sc // 10 % 10, sc % 10)
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError,
            msgpack.UnpackException) as exc:
        raise ValueError(f"customer {customer_id!r}: malformed stored value "
                         f"({type(exc).__name__}: {exc})") from exc
    return StoredCustomer(customer_id, state, seg, cl, scores, chg, hc)
