"""How one customer is stored: a single Redis hash per customer (``rfm:<ns>:{p<N>}:c:<id>``).

Fields (all strings; absent or empty = none):

``f`` ``buy`` ``ref``  frequency, purchases and refunds (minor units), all-time
``last`` ``first``     last and first purchase (epoch ms)
``ev``                 recent event ids, JSON list, newest first
``o``                  recent orders, JSON ``[[order_id, bought, refunded, first_ms], ...]``
``w``                  window buckets, JSON ``[[index, orders, purchases, refunds], ...]``
``seg`` ``cl``         the segment and cluster id last published
``sc``                 the R, F, M scores at the customer's last evaluation, e.g. ``"541"``
``chg``                as-of time (epoch ms) of the last published change
``hc``                 cause of a change the flapping guard holds back, until it is published
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson

from state.rfm import Bucket, CustomerState, Order

FIELDS = ("f", "buy", "ref", "last", "first", "ev", "o", "w", "seg", "cl", "sc", "chg", "hc")


@dataclass(frozen=True, slots=True)
class StoredCustomer:
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


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode("utf-8")


def encode(c: StoredCustomer) -> dict[str, str]:
    """The hash fields of a customer (every field of :data:`FIELDS`, empty where none)."""
    s = c.state
    return {
        "f": str(s.frequency), "buy": str(s.purchases_minor), "ref": str(s.refunds_minor),
        "last": "" if s.last_purchase_ms is None else str(s.last_purchase_ms),
        "first": "" if s.first_purchase_ms is None else str(s.first_purchase_ms),
        "ev": _dumps(list(s.recent_event_ids)),
        "o": _dumps([[o.order_id, o.bought_minor, o.refunded_minor, o.first_ms]
                     for o in s.orders]),
        "w": _dumps([[b.index, b.orders, b.purchases_minor, b.refunds_minor]
                     for b in s.buckets]) if s.buckets else "",
        "seg": c.segment or "", "cl": "" if c.cluster is None else str(c.cluster),
        "sc": "" if c.scores is None else "".join(map(str, c.scores)),
        "chg": "" if c.changed_ms is None else str(c.changed_ms),
        "hc": c.held_cause or "",
    }


def decode(customer_id: str, values: Sequence[str | None] | Mapping[str, str | None]
           ) -> StoredCustomer | None:
    """A customer from its hash fields (in :data:`FIELDS` order, or a mapping); None when the
    hash does not exist.

    Raises
    ------
    ValueError
        When a field is malformed.
    """
    v = (dict(zip(FIELDS, values, strict=True)) if not isinstance(values, Mapping)
         else dict(values))
    if all(v.get(k) in (None, "") for k in FIELDS):
        return None
    state = CustomerState(
        frequency=int(v.get("f") or 0), purchases_minor=int(v.get("buy") or 0),
        refunds_minor=int(v.get("ref") or 0), last_purchase_ms=opt_int(v.get("last")),
        first_purchase_ms=opt_int(v.get("first")),
        recent_event_ids=tuple(orjson.loads(v.get("ev") or "[]")),
        orders=tuple(Order(str(o[0]), int(o[1]), int(o[2]), int(o[3]))
                     for o in orjson.loads(v.get("o") or "[]")),
        buckets=tuple(Bucket(*map(int, b)) for b in orjson.loads(v.get("w") or "[]")))
    sc = v.get("sc") or ""
    return StoredCustomer(customer_id, state, v.get("seg") or None, opt_int(v.get("cl")),
                          (int(sc[0]), int(sc[1]), int(sc[2])) if len(sc) == 3 else None,
                          opt_int(v.get("chg")), v.get("hc") or None)
