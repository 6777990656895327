"""How one customer is stored: one Redis string per customer (``rfm:<ns>:{p<N>}:c:<id>``)
holding a compact MessagePack array, read with one ``GET`` (or ``MGET`` of a page, without
the client's text decoding) and decoded with one ``msgpack.unpackb``:

``[4, seg, cl, f, buy, ref, last, first, ev, o, w, sc, chg, hc]``

``4``                  format version (formats 1-3 are still read, converted when decoded,
                       and rewritten as 4 by the customer's next write)
``seg`` ``cl``         the segment and cluster id last published (nil: none)
``f`` ``buy`` ``ref``  frequency, purchases and refunds (minor units), all-time
``last`` ``first``     last and first purchase (epoch ms, nil: none)
``ev``                 recent event ids, newest first: their 8-byte ``state.rfm.id_key``
                       digests, concatenated in one string
``o``                  recent orders, newest first, as four columns ``[ids, bought, refunded,
                       first days]``: the orders' 8-byte digests concatenated, then three
                       arrays of integers (minor units, minor units, days since the epoch)
``w``                  window buckets ``[[index, orders, purchases, refunds], ...]``
``sc``                 the R, F, M scores at the last evaluation as one number, e.g. ``541``
``chg``                as-of time (epoch ms) of the last published change
``hc``                 cause of a change the flapping guard holds back, until it is published

One value instead of a hash of fields: a step reads and writes whole customers, and a single
string costs less memory and CPU (one parse, no per-field encoding) than a hash. A customer
with 8 orders takes ~248 bytes (``bench/redis_memory.py``): format 3 (the same array with ids
as text, or as ``#`` and a 72-bit digest in base64 when longer than 13 characters, and each
order an array of its own) took ~300, the JSON text of formats 1-2 ~414. Digests are
MessagePack raw strings, not the binary type, which Redis 6.2's Lua ``cmsgpack`` does not
read (``forget.lua`` reads ``seg``).

Formats are told apart by the first bytes: MessagePack's 14-element array is ``0x9e``, then
the version (``0x03``, ``0x04``); anything else is read as JSON (formats 1-2). Releases before
format 4 do not read it: ``encode`` still writes formats 2 and 3 when asked
(``RFM_STATE_FORMAT``, README "Upgrading") for a state that remembers ids as text (new
customers with ``state.rfm.Limits.text_ids``, and values of formats 1-3 decoded with
``text_ids=True``); a customer already in format 4 stays in format 4 (its digests have no
text form, and such a release could not read it anyway).
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack
import orjson

from state.rfm import (
    ID_DIGEST_BYTES,
    MS_PER_DAY,
    Bucket,
    CustomerState,
    Order,
    id_key,
    id_text,
    remembers_text,
    text_to_key,
)

FORMAT = 4
MSGPACK_ARRAY = b"\x9e"  # the first byte of a format-3 or -4 value: a 14-element array
_FORMAT_4 = b"\x9e\x04"


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
    """The stored value of a customer (see the module docstring) in format ``fmt``: 4, or 3
    or 2 (what releases before format 4 and 3 read, for a rolling upgrade from them) when its
    state remembers ids as text (``state.rfm.id_text``); a state that remembers them as
    digests is written in format 4 whatever ``fmt`` asks.

    Raises
    ------
    ValueError
        When ``fmt`` is not 2, 3 or 4.
    """
    s, sc = c.state, c.scores
    orders = s.orders
    fields = [fmt, c.segment, c.cluster, s.frequency, s.purchases_minor, s.refunds_minor,
              s.last_purchase_ms, s.first_purchase_ms, s.recent_event_ids, orders, s.buckets,
              None if sc is None else sc[0] * 100 + sc[1] * 10 + sc[2], c.changed_ms,
              c.held_cause]
    if fmt not in (2, 3, FORMAT):
        raise ValueError(f"stored format {fmt!r}: 2, 3 or {FORMAT}")
    text = remembers_text(s)
    if fmt != FORMAT and text is False:
        fmt = fields[0] = FORMAT
    elif fmt == FORMAT and text:  # text of formats 1-3: convert
        fields[8] = tuple(map(text_to_key, s.recent_event_ids))
        orders = tuple(o._replace(order_id=text_to_key(o.order_id)) for o in orders)
    if fmt == FORMAT:
        fields[8] = b"".join(fields[8])
        ids, bought, refunded, days = zip(*orders, strict=True) if orders else ((), (), (), ())
        fields[9] = [b"".join(ids), bought, refunded, days]
    if fmt == 2:  # orjson writes named tuples only as plain tuples
        fields[9:11] = list(map(tuple, orders)), list(map(tuple, s.buckets))
        return orjson.dumps(fields)
    # raw strings (also for digests): the formats Redis's Lua cmsgpack reads (forget.lua)
    return msgpack.packb(fields, use_bin_type=False)


_INT, _OPT_INT, _OPT_STR = {int}, {int, type(None)}, {str, type(None)}  # int: not bool
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last time a datetime can hold
MAX_MINOR = 2**63 - 1  # what an int64 column (the export) holds
MAX_DAY = MAX_MS // MS_PER_DAY
CAUSES = ("purchase", "refund", "inactivity", "rescore")  # of a change; ``hc`` holds one
_SCORES = frozenset(r * 100 + f * 10 + m for r in range(1, 6) for f in range(1, 6)
                    for m in range(1, 6))  # sc: R, F, M in 1..5


def _typed(seg: object, cl: object, f: object, buy: object, ref: object, last: object,
           first: object, ev: object, orders: object, buckets: object, sc: object,
           chg: object, hc: object) -> bool:
    """Whether decoded fields have their types (see the module docstring) and ranges (counts,
    amounts and cluster ids in 0..2^63-1, times in 0..:data:`MAX_MS`, scores 1-5, a held
    cause one of :data:`CAUSES`), so that a value written by hand or by a bug fails here, as
    malformed, and not later in a step of other customers (a due re-score reads all but
    ``ev`` and ``o``; those two are read only by the customer's own events; ``decode`` checks
    the orders' amounts and days, which a write would fail to encode, but not ``ev``'s
    items)."""
    return ({type(f), type(buy), type(ref)} <= _INT
            and {type(cl), type(last), type(first), type(sc), type(chg)} <= _OPT_INT
            and {type(seg), type(hc)} <= _OPT_STR
            and type(ev) is list and type(orders) is list and type(buckets) is list
            and all(type(b) is list and len(b) == 4 and set(map(type, b)) <= _INT
                    and all(0 <= x <= MAX_MINOR for x in b) for b in buckets)
            and 0 <= f <= MAX_MINOR and 0 <= buy <= MAX_MINOR and 0 <= ref <= MAX_MINOR
            and (cl is None or 0 <= cl <= MAX_MINOR)  # type: ignore[operator]
            and (sc is None or sc in _SCORES) and (hc is None or hc in CAUSES)
            and all(t is None or 0 <= t <= MAX_MS for t in (last, first, chg)))


def _digests(blob: object) -> list[bytes]:
    """Concatenated 8-byte digests, split; TypeError when malformed."""
    if type(blob) is not bytes or len(blob) % ID_DIGEST_BYTES:
        raise TypeError("malformed digests")
    k = ID_DIGEST_BYTES
    return [blob[i:i + k] for i in range(0, len(blob), k)]


def _orders_4(o: object) -> list[tuple[bytes, int, int, int]]:
    """Format 4's order columns as order rows; TypeError/ValueError when malformed."""
    ids, bought, refunded, days = o  # type: ignore[misc]
    if not type(bought) is type(refunded) is type(days) is list \
            or not len(ids) == len(bought) * ID_DIGEST_BYTES \
            or not len(bought) == len(refunded) == len(days) \
            or not set(map(type, bought + refunded + days)) <= _INT:
        raise TypeError("malformed order columns (types or lengths)")
    return list(zip(_digests(ids), bought, refunded, days, strict=True))


def decode(customer_id: str, value: bytes | str | None, *, text_ids: bool = False
           ) -> StoredCustomer | None:
    """A customer from its stored value (format 4, or formats 1-3); None when there is none.

    Format 4 gives ids as ``state.rfm.id_key`` digests; formats 1-3 give them in the text
    form formats 2-3 store with ``text_ids`` (for a store that writes those formats), else as
    digests too (converted).

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
        if isinstance(value, bytes) and value[:2] == _FORMAT_4:
            (fmt, seg, cl, f, buy, ref, last, first, ev_raw, o, buckets, sc, chg, hc
             ) = msgpack.unpackb(value, raw=True)
            seg = seg if seg is None else seg.decode("utf-8")
            hc = hc if hc is None else hc.decode("utf-8")
            ev: list = _digests(ev_raw)
            orders: list = _orders_4(o)
        elif isinstance(value, str) or value[:1] != MSGPACK_ARRAY:  # JSON: formats 1 and 2
            (fmt, seg, cl, f, buy, ref, last, first, ev, orders, buckets, sc, chg, hc
             ) = orjson.loads(value)
        else:
            (fmt, seg, cl, f, buy, ref, last, first, ev, orders, buckets, sc, chg, hc
             ) = msgpack.unpackb(value)
        if not _typed(seg, cl, f, buy, ref, last, first, ev, orders, buckets, sc, chg, hc):
            raise TypeError("a field of the wrong type or out of range")
        if fmt == 1:  # full ids, order times in ms
            key = id_text if text_ids else id_key
            ev = [key(e) for e in ev]
            orders = [(key(o), b, r, t // MS_PER_DAY) for o, b, r, t in orders]
        elif fmt in (2, 3) and not text_ids:
            ev = [text_to_key(e) for e in ev]
            orders = [(text_to_key(o), b, r, d) for o, b, r, d in orders]
        elif fmt not in (2, 3, FORMAT):
            raise ValueError(f"stored format {fmt!r}, expected {FORMAT}")
        if not all(
                0 <= b <= MAX_MINOR and 0 <= r <= MAX_MINOR and 0 <= d <= MAX_DAY
                for _, b, r, d in orders):
            raise TypeError("an order's amounts or day out of range")
        state = CustomerState(f, buy, ref, last, first, tuple(ev),
                              tuple(map(Order._make, orders)), tuple(map(Bucket._make, buckets)))
        scores = None if sc is None else (sc // 100, sc // 10 % 10, sc % 10)
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError,
            msgpack.UnpackException) as exc:
        why = str(exc) or (type(exc).__doc__ or "").strip()  # msgpack's StackError: no text
        raise ValueError(f"customer {customer_id!r}: malformed stored value "
                         f"({type(exc).__name__}: {why})") from exc
    return StoredCustomer(customer_id, state, seg, cl, scores, chg, hc)
