"""A customer's incremental RFM state and its update rule, as a pure fold.

``apply_event(state, event, limits) -> (state, applied)`` has no I/O and no clock. It is the
only implementation of the rule: the worker folds a batch with it, and one Lua script
(``state/lua/commit.lua``) writes the result atomically, compare-and-set on the partition's
commit sequence, so the state it started from is the state it replaces.

Rules (README "RFM definitions"):

- **Recency** is derived, not stored: days from ``last_purchase_ms`` to an as-of time
  (:func:`recency_days`). A late event never moves ``last_purchase_ms`` backwards; a refund
  never moves it at all.
- **Frequency** is the number of distinct purchase orders: a purchase whose ``order_id`` is
  among the customer's last ``limits.order_ids`` orders adds money but not frequency (several
  line events of one order count once). An order that refunds return in full (refunded >=
  bought > 0) stops counting; a later purchase line of it makes it count again. Only the
  remembered orders can be returned this way: a refund naming an older or unknown order
  reduces monetary only.
- **Monetary** is purchases minus refunds in minor currency units (cents), never below zero.
  Both sums are kept, so the result does not depend on the order in which they arrive.
- **Window** (optional, :class:`Window`): frequency and monetary may be counted over the last
  ``days`` only, from per-customer buckets of ``bucket_days`` (bounded memory; an event older
  than every kept bucket is left out of the windowed values, never out of the all-time ones).
- **Idempotency**: an event whose ``event_id`` is among the customer's last
  ``limits.event_ids`` applied ids is skipped, so the same event published twice counts once.
  Memory per customer is bounded by the limits and the window. Ids are remembered as 64-bit
  digests (:func:`id_key`), and an order's time at day resolution (all a window bucket needs).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Literal, NamedTuple

MS_PER_DAY = 86_400_000

EventKind = Literal["purchase", "refund"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a customer's state remembers.

    Parameters
    ----------
    event_ids
        How many recently applied ``event_id`` values are kept for de-duplication (>= 1).
    order_ids
        How many recent purchase orders are kept (id, amount bought, amount refunded), so that
        several line events of one order count once and a full refund can remove it (>= 1).
    text_ids
        A new customer remembers ids in their :func:`id_text` form (what formats 2-3 of
        ``state.codec`` store: set for a store that writes those formats) instead of
        :func:`id_key`. A customer's ids keep the form they have: :func:`apply_event` follows
        the state.
    """

    event_ids: int = 32
    order_ids: int = 32
    text_ids: bool = False

    def __post_init__(self) -> None:
        if self.event_ids < 1 or self.order_ids < 1:
            raise ValueError(f"limits must be >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding window for frequency and monetary: the last ``days`` days, kept in buckets.

    Bucket ``i`` holds the events with ``i == occurred_ms // (bucket_days * MS_PER_DAY)``. At
    as-of time ``t`` the window is the ``days // bucket_days`` buckets ending with the one that
    holds ``t`` (and any later one). ``days`` must be a multiple of ``bucket_days``.

    >>> Window(365, 5).buckets
    73
    """

    days: int
    bucket_days: int = 30

    def __post_init__(self) -> None:
        if self.bucket_days < 1 or self.days < self.bucket_days or self.days % self.bucket_days:
            raise ValueError(f"window days {self.days} must be a positive multiple of "
                             f"bucket_days {self.bucket_days}")

    @property
    def buckets(self) -> int:
        return self.days // self.bucket_days

    @property
    def bucket_ms(self) -> int:
        return self.bucket_days * MS_PER_DAY

    def first_bucket(self, as_of_ms: int) -> int:
        """Index of the oldest bucket inside the window at ``as_of_ms``."""
        return as_of_ms // self.bucket_ms - self.buckets + 1


class StateEvent(NamedTuple):
    """A validated purchase or refund, reduced to what the RFM state needs.

    Parameters
    ----------
    event_id
        The producer's unique id (the de-duplication key).
    order_id
        The order the event belongs to (for a refund: the order it returns money of).
    kind
        ``"purchase"`` or ``"refund"``.
    amount_minor
        Amount in minor units of the reporting currency (cents), >= 0.
    occurred_ms
        Event time, milliseconds since the Unix epoch (UTC).
    """

    event_id: str
    order_id: str
    kind: EventKind
    amount_minor: int
    occurred_ms: int


ID_RAW_MAX = 13  # ids up to this long keep their text in formats 2-3 (a digest is no shorter)
ID_DIGEST_BYTES = 8

IdKey = bytes | str  # an id as a state remembers it: id_key (format 4) or id_text (formats 2-3)


def _blake2b_72(value: str) -> bytes:
    return hashlib.blake2b(value.encode("utf-8"), digest_size=9).digest()


def id_key(value: str) -> bytes:
    """The form in which a customer's state remembers an event or order id: 8 bytes, the first
    64 bits of the id's 72-bit BLAKE2b digest (RFC 7693; the digest that formats 2-3 of
    ``state.codec`` kept for long ids, so that those convert: :func:`text_to_key`). Two
    different ids share a key with probability 2^-64 per pair: among the 32 ids a customer
    remembers, a genuine event is taken for a duplicate about once in 5 * 10^17 events.

    >>> k = id_key("pos-1234-1")
    >>> len(k), k == id_key("pos-1234-1"), k == id_key("pos-1234-2")
    (8, True, False)
    """
    return _blake2b_72(value)[:ID_DIGEST_BYTES]


def id_text(value: str) -> str:
    """The text form of an id that formats 2-3 of ``state.codec`` store (written only while
    ``RFM_STATE_FORMAT`` asks for those formats, during a rolling upgrade): the id itself when
    it is at most :data:`ID_RAW_MAX` characters and does not start with ``#``, else ``#`` and
    12 URL-safe base64 characters of its 72-bit BLAKE2b digest.

    >>> id_text("pos-1234-1")
    'pos-1234-1'
    >>> k = id_text("0b7e6a2c-5f1d-4c9a-9f7e-2d3b1a0c9e8f")
    >>> len(k), k[0], k == id_text("0b7e6a2c-5f1d-4c9a-9f7e-2d3b1a0c9e8f")
    (13, '#', True)
    """
    if len(value) <= ID_RAW_MAX and not value.startswith("#"):
        return value
    return "#" + base64.urlsafe_b64encode(_blake2b_72(value)).decode("ascii")


def text_to_key(text: str) -> bytes:
    """The :func:`id_key` of an id stored in the :func:`id_text` form.

    >>> long_id = "0b7e6a2c-5f1d-4c9a-9f7e-2d3b1a0c9e8f"
    >>> text_to_key(id_text(long_id)) == id_key(long_id), text_to_key("e1") == id_key("e1")
    (True, True)

    Raises
    ------
    ValueError
        When ``text`` starts with ``#`` but is not a digest's text (formats 2-3 never hold one).
    """
    if not text.startswith("#"):
        return id_key(text)
    digest = base64.urlsafe_b64decode(text[1:].encode("ascii"))
    if len(digest) != 9:
        raise ValueError(f"{text!r} is not the text of a 72-bit digest")
    return digest[:ID_DIGEST_BYTES]


def remembers_text(state: CustomerState) -> bool | None:
    """Whether ``state`` remembers ids as text (:func:`id_text`) rather than digests
    (:func:`id_key`); None when it remembers none. A state's ids all have one form."""
    first = state.recent_event_ids[:1] or tuple(o.order_id for o in state.orders[:1])
    return type(first[0]) is str if first else None


class Order(NamedTuple):
    """A remembered purchase order: its id (:func:`id_key`, or :func:`id_text`), amounts
    bought and refunded (minor units) and the day of its first line (days since the Unix
    epoch, UTC), which places it in a window bucket."""

    order_id: IdKey
    bought_minor: int
    refunded_minor: int
    first_day: int

    @property
    def returned(self) -> bool:
        """Fully refunded: it no longer counts in frequency."""
        return 0 < self.bought_minor <= self.refunded_minor


class Bucket(NamedTuple):
    """One window bucket: orders, purchases and refunds (minor units) whose time falls in it."""

    index: int
    orders: int = 0
    purchases_minor: int = 0
    refunds_minor: int = 0


class CustomerState(NamedTuple):
    """One customer's RFM state.

    ``recent_event_ids`` and ``orders`` are newest first and bounded by :class:`Limits`;
    ``buckets`` (only with a :class:`Window`) are ascending by index. Money is in minor units
    of the reporting currency; times in epoch ms.
    """

    frequency: int = 0
    purchases_minor: int = 0
    refunds_minor: int = 0
    last_purchase_ms: int | None = None
    first_purchase_ms: int | None = None
    recent_event_ids: tuple[IdKey, ...] = ()
    orders: tuple[Order, ...] = ()
    buckets: tuple[Bucket, ...] = ()

    @property
    def monetary_minor(self) -> int:
        """Purchases minus refunds in minor units, never below zero."""
        return max(0, self.purchases_minor - self.refunds_minor)

    @property
    def has_purchased(self) -> bool:
        """True once the customer has at least one purchase (only then is it scored)."""
        return self.last_purchase_ms is not None


def _add_to_bucket(buckets: tuple[Bucket, ...], window: Window | None, at_ms: int,
                   orders: int = 0, purchases: int = 0, refunds: int = 0) -> tuple[Bucket, ...]:
    """Add amounts to the bucket of ``at_ms``. Only buckets within ``window.buckets`` of the
    newest one are kept; an amount for an older bucket is left out."""
    if window is None:
        return buckets
    i = at_ms // window.bucket_ms
    if buckets and buckets[-1].index == i:  # the newest bucket: the usual case
        b = buckets[-1]
        return buckets[:-1] + (Bucket(i, b.orders + orders, b.purchases_minor + purchases,
                                      b.refunds_minor + refunds),)
    newest = max([i, *(b.index for b in buckets)])
    if i <= newest - window.buckets:
        return buckets
    by_index = {b.index: b for b in buckets if b.index > newest - window.buckets}
    b = by_index.get(i, Bucket(i))
    by_index[i] = Bucket(i, b.orders + orders, b.purchases_minor + purchases,
                         b.refunds_minor + refunds)
    return tuple(by_index[k] for k in sorted(by_index))


def apply_event(state: CustomerState | None, event: StateEvent, limits: Limits = Limits(),
                window: Window | None = None) -> tuple[CustomerState, bool]:
    """Fold one event into a customer's state.

    Parameters
    ----------
    state
        The current state, or None for a customer never seen.
    event
        The event to apply.
    limits
        Memory bounds (recent event ids, recent orders) and the form of remembered ids.
    window
        When given, the event is also added to its window bucket.

    Returns
    -------
    (CustomerState, bool)
        The new state and whether the event was applied (False: a duplicate ``event_id``,
        the state is returned unchanged).

    The event's ids are taken in the form the state remembers ids in (:func:`id_key` or
    :func:`id_text`); for a state that remembers none, in the form ``limits.text_ids`` asks.

    Examples
    --------
    >>> e1 = StateEvent("e1", "o1", "purchase", 1177, 1_000)
    >>> s, applied = apply_event(None, e1)
    >>> (s.frequency, s.monetary_minor, s.last_purchase_ms, applied)
    (1, 1177, 1000, True)
    >>> s2, applied = apply_event(s, e1)  # the same event again
    >>> (s2 == s, applied)
    (True, False)
    >>> s3, _ = apply_event(s, StateEvent("e2", "o1", "purchase", 23, 500))  # 2nd line, late
    >>> (s3.frequency, s3.monetary_minor, s3.last_purchase_ms, s3.first_purchase_ms)
    (1, 1200, 1000, 500)
    >>> s4, _ = apply_event(s3, StateEvent("e3", "o1", "refund", 5000, 9_000))  # all of o1
    >>> (s4.frequency, s4.monetary_minor, s4.last_purchase_ms)
    (0, 0, 1000)
    """
    current = state if state is not None else CustomerState()
    text = remembers_text(current)
    key = id_text if (limits.text_ids if text is None else text) else id_key
    event_id = key(event.event_id)
    if event_id in current.recent_event_ids:
        return current, False
    event_ids = ((event_id,) + current.recent_event_ids)[:limits.event_ids]
    t, amount = event.occurred_ms, event.amount_minor
    order_id = key(event.order_id)
    known = None
    for o in current.orders:
        if o.order_id == order_id:
            known = o
            break
    if event.kind == "refund":
        buckets = _add_to_bucket(current.buckets, window, t, refunds=amount)
        frequency, orders = current.frequency, current.orders
        if known is not None:
            updated = known._replace(refunded_minor=known.refunded_minor + amount)
            orders = tuple(updated if o is known else o for o in orders)
            if updated.returned and not known.returned:
                frequency -= 1
                buckets = _add_to_bucket(buckets, window, known.first_day * MS_PER_DAY,
                                         orders=-1)
        return CustomerState(frequency, current.purchases_minor,
                             current.refunds_minor + amount, current.last_purchase_ms,
                             current.first_purchase_ms, event_ids, orders, buckets), True
    if known is None:
        order = Order(order_id, amount, 0, t // MS_PER_DAY)
        orders = ((order,) + current.orders)[:limits.order_ids]
        counted = 1
        buckets = _add_to_bucket(current.buckets, window, t, orders=1, purchases=amount)
    else:
        order = known._replace(bought_minor=known.bought_minor + amount)
        orders = tuple(order if o is known else o for o in current.orders)
        counted = int(known.returned) - int(order.returned)
        buckets = _add_to_bucket(current.buckets, window, t, purchases=amount)
        if counted:
            buckets = _add_to_bucket(buckets, window, known.first_day * MS_PER_DAY,
                                     orders=counted)
    last, first = current.last_purchase_ms, current.first_purchase_ms
    return CustomerState(current.frequency + counted, current.purchases_minor + amount,
                         current.refunds_minor, t if last is None else max(last, t),
                         t if first is None else min(first, t), event_ids, orders,
                         buckets), True


def recency_days(last_purchase_ms: int, as_of_ms: int) -> int:
    """Whole days from the last purchase to the as-of time, floored, never negative.

    Examples
    --------
    >>> recency_days(0, MS_PER_DAY - 1), recency_days(0, MS_PER_DAY), recency_days(5, 0)
    (0, 1, 0)
    """
    return max(0, (as_of_ms - last_purchase_ms) // MS_PER_DAY)


def frequency_monetary(state: CustomerState, as_of_ms: int, window: Window | None = None
                       ) -> tuple[int, int]:
    """``(frequency, monetary_minor)`` at ``as_of_ms``: all-time, or over the window.

    Windowed monetary is the window's purchases minus its refunds, never below zero.

    >>> w = Window(60, 30)
    >>> s = None
    >>> for e in [StateEvent("a", "o1", "purchase", 500, 0),
    ...           StateEvent("b", "o2", "purchase", 700, 40 * MS_PER_DAY)]:
    ...     s, _ = apply_event(s, e, window=w)
    >>> frequency_monetary(s, 50 * MS_PER_DAY, w), frequency_monetary(s, 70 * MS_PER_DAY, w)
    ((2, 1200), (1, 700))
    """
    if window is None:
        return state.frequency, state.monetary_minor
    first = window.first_bucket(as_of_ms)
    inside = [b for b in state.buckets if b.index >= first]
    return (sum(b.orders for b in inside),
            max(0, sum(b.purchases_minor - b.refunds_minor for b in inside)))


def window_expiry_ms(state: CustomerState, as_of_ms: int, window: Window | None) -> int | None:
    """The next event time after ``as_of_ms`` at which a non-empty bucket leaves the window
    (the windowed values may change then without any event); None when nothing will.

    >>> w = Window(60, 30)
    >>> s, _ = apply_event(None, StateEvent("a", "o1", "purchase", 500, 0), window=w)
    >>> window_expiry_ms(s, 0, w) == 60 * MS_PER_DAY, window_expiry_ms(s, 60 * MS_PER_DAY, w)
    (True, None)
    """
    if window is None:
        return None
    first = window.first_bucket(as_of_ms)
    live = [b.index for b in state.buckets if b.index >= first
            and (b.orders or b.purchases_minor or b.refunds_minor)]
    return (min(live) + window.buckets) * window.bucket_ms if live else None


class Record(NamedTuple):
    """One Kafka record of a batch.

    ``customer_id``/``event`` are None for a record that was dead-lettered: it still
    advances the partition's applied offset.
    """

    offset: int
    customer_id: str | None
    event: StateEvent | None


class BatchOutcome(NamedTuple):
    """Counts of one batch's events: applied, skipped by offset, skipped by ``event_id``.

    Dead-letter records (no event) are not counted.
    """

    applied: int = 0
    duplicate_offsets: int = 0
    duplicate_events: int = 0
