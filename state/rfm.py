"""A customer's incremental RFM state and its update rule, as a pure fold.

``apply_event(state, event, limits) -> (state, applied)`` has no I/O and no clock. It is the
reference the Lua script in ``state/lua/apply_batch.lua`` must match: a differential test
runs both over generated event sequences and demands identical state.

Rules (README "RFM definitions"):

- **Recency** is derived, not stored: days from ``last_purchase_ms`` to an as-of time
  (:func:`recency_days`). A late event never moves ``last_purchase_ms`` backwards; a refund
  never moves it at all.
- **Frequency** is the number of distinct purchase orders: a purchase whose ``order_id`` is
  among the customer's last ``limits.order_ids`` orders adds money but not frequency (several
  line events of one order count once).
- **Monetary** is purchases minus refunds in minor currency units (cents), never below zero.
  Both sums are kept, so the result does not depend on the order in which they arrive.
- **Idempotency**: an event whose ``event_id`` is among the customer's last
  ``limits.event_ids`` applied ids is skipped, so the same event published twice counts once.
  Memory per customer is bounded by the two limits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

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
        How many recent purchase ``order_id`` values are kept so that several line events of
        one order count once in frequency (>= 1).
    """

    event_ids: int = 32
    order_ids: int = 32

    def __post_init__(self) -> None:
        if self.event_ids < 1 or self.order_ids < 1:
            raise ValueError(f"limits must be >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class StateEvent:
    """A validated purchase or refund, reduced to what the RFM state needs.

    Parameters
    ----------
    event_id
        The producer's unique id (the de-duplication key).
    order_id
        The order the event belongs to.
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


@dataclass(frozen=True, slots=True)
class CustomerState:
    """One customer's RFM state.

    ``recent_event_ids`` and ``recent_order_ids`` are newest first and bounded by
    :class:`Limits`. Money is in minor units of the reporting currency; times in epoch ms.
    """

    frequency: int = 0
    purchases_minor: int = 0
    refunds_minor: int = 0
    last_purchase_ms: int | None = None
    first_purchase_ms: int | None = None
    recent_event_ids: tuple[str, ...] = ()
    recent_order_ids: tuple[str, ...] = ()

    @property
    def monetary_minor(self) -> int:
        """Purchases minus refunds in minor units, never below zero."""
        return max(0, self.purchases_minor - self.refunds_minor)

    @property
    def has_purchased(self) -> bool:
        """True once the customer has at least one purchase (only then is it scored)."""
        return self.last_purchase_ms is not None


def _push(items: tuple[str, ...], item: str, limit: int) -> tuple[str, ...]:
    return ((item,) + items)[:limit]


def apply_event(
    state: CustomerState | None, event: StateEvent, limits: Limits = Limits()
) -> tuple[CustomerState, bool]:
    """Fold one event into a customer's state.

    Parameters
    ----------
    state
        The current state, or None for a customer never seen.
    event
        The event to apply.
    limits
        Memory bounds (recent event ids, recent order ids).

    Returns
    -------
    (CustomerState, bool)
        The new state and whether the event was applied (False: a duplicate ``event_id``,
        the state is returned unchanged).

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
    >>> s4, _ = apply_event(s3, StateEvent("e3", "o1", "refund", 5000, 9_000))
    >>> (s4.monetary_minor, s4.last_purchase_ms)
    (0, 1000)
    """
    current = state if state is not None else CustomerState()
    if event.event_id in current.recent_event_ids:
        return current, False
    event_ids = _push(current.recent_event_ids, event.event_id, limits.event_ids)
    if event.kind == "refund":
        return replace(current, refunds_minor=current.refunds_minor + event.amount_minor,
                       recent_event_ids=event_ids), True
    new_order = event.order_id not in current.recent_order_ids
    t = event.occurred_ms
    last, first = current.last_purchase_ms, current.first_purchase_ms
    return replace(
        current,
        frequency=current.frequency + (1 if new_order else 0),
        purchases_minor=current.purchases_minor + event.amount_minor,
        last_purchase_ms=t if last is None else max(last, t),
        first_purchase_ms=t if first is None else min(first, t),
        recent_event_ids=event_ids,
        recent_order_ids=(_push(current.recent_order_ids, event.order_id, limits.order_ids)
                          if new_order else current.recent_order_ids),
    ), True


def recency_days(last_purchase_ms: int, as_of_ms: int) -> int:
    """Whole days from the last purchase to the as-of time, floored, never negative.

    Examples
    --------
    >>> recency_days(0, MS_PER_DAY - 1), recency_days(0, MS_PER_DAY), recency_days(5, 0)
    (0, 1, 0)
    """
    return max(0, (as_of_ms - last_purchase_ms) // MS_PER_DAY)


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record of a batch, as the partition-level fold sees it.

    ``customer_id``/``event`` are None for a record that was dead-lettered: it still
    advances the partition's applied offset.
    """

    offset: int
    customer_id: str | None
    event: StateEvent | None


@dataclass(frozen=True, slots=True)
class PartitionState:
    """What a partition remembers: last applied offset (-1: none) and max event time (ms)."""

    last_offset: int = -1
    max_event_ms: int | None = None


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """Counts of one batch's events: applied, skipped by offset, skipped by ``event_id``.

    Dead-letter records (no event) are not counted.
    """

    applied: int = 0
    duplicate_offsets: int = 0
    duplicate_events: int = 0


def apply_batch(
    partition: PartitionState,
    customers: dict[str, CustomerState],
    records: list[Record],
    limits: Limits = Limits(),
) -> tuple[PartitionState, dict[str, CustomerState], BatchOutcome]:
    """Fold a batch of one partition's records, in offset order (the Lua script's reference).

    Records at or below ``partition.last_offset`` are skipped (a redelivery). The partition's
    max event time advances with every applied event. ``customers`` is not mutated.

    Returns
    -------
    (PartitionState, dict, BatchOutcome)
        The new partition state, the new states of the customers the batch names
        (also those whose events were all duplicates), and the counts.
    """
    out = dict(customers)
    last_offset, max_ms = partition.last_offset, partition.max_event_ms
    applied = dup_off = dup_ev = 0
    for rec in records:
        if rec.offset <= last_offset:
            dup_off += rec.event is not None
            continue
        last_offset = rec.offset
        if rec.event is None or rec.customer_id is None:
            continue
        state, ok = apply_event(out.get(rec.customer_id), rec.event, limits)
        out[rec.customer_id] = state
        if ok:
            applied += 1
            t = rec.event.occurred_ms
            max_ms = t if max_ms is None else max(max_ms, t)
        else:
            dup_ev += 1
    return (PartitionState(last_offset, max_ms), out,
            BatchOutcome(applied, dup_off, dup_ev))
