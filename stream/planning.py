"""Plan one partition batch: per event, in offset order, the new RFM state, scores, segment,
cluster and segment change. Pure (the clustering model is the only thing it mutates: it learns).

Given the same starting view, records, thresholds and model, the plan is the same: that is what
makes a replay of one partition reproduce the same segment changes. The plan is committed by
one atomic script (``state/lua/apply_batch.lua``), whose RFM fold is the twin of the one here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from state.rfm import BatchOutcome, Limits, Record, apply_event, recency_days
from state.store import Assigned, PartitionView
from stream.changes import change_id, is_change
from stream.clustering import CustomerClusterer, features
from stream.events import Assignment, SegmentChanged
from stream.scoring import Thresholds
from stream.segments import SegmentTable


@dataclass(frozen=True, slots=True)
class PlanContext:
    """What scoring needs besides the data: rules, thresholds, model, currency, clock."""

    table: SegmentTable
    thresholds: Thresholds
    clusterer: CustomerClusterer
    limits: Limits
    currency: str
    currency_decimals: int
    now_ms: int


@dataclass
class Plan:
    """A batch's outcome before it is committed."""

    records: list[Record]
    assignments: dict[str, Assigned] = field(default_factory=dict)
    changes: list[SegmentChanged] = field(default_factory=list)
    outcome: BatchOutcome = BatchOutcome()
    last_offset: int = -1
    watermark: int | None = None


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def as_of(own_watermark: int, others: tuple[int, ...]) -> int:
    """The event-time watermark: the minimum over partitions of their highest event time.

    >>> as_of(500, ()), as_of(500, (300, 900))
    (500, 300)
    """
    return min(own_watermark, *others) if others else own_watermark


def plan_batch(view: PartitionView, records: list[Record], ctx: PlanContext) -> Plan:
    """Fold the records into the customers' states, one event at a time, and decide changes.

    Records at or below ``view.last_offset`` are skipped (redelivered); a duplicate
    ``event_id`` is skipped by the fold. After each applied event of a customer who has
    purchased, the customer is scored at the watermark, given a segment and (learning first) a
    cluster, and a :class:`SegmentChanged` is planned when :func:`is_change` says so.
    """
    plan = Plan(records=records, last_offset=view.last_offset, watermark=view.watermark)
    states = {cid: (c.state if c else None) for cid, c in view.customers.items()}
    current = {cid: (Assignment(segment=c.segment, cluster=c.cluster)
                     if c is not None and c.segment is not None else None)
               for cid, c in view.customers.items()}
    applied = dup_off = dup_ev = 0
    scale = 10 ** ctx.currency_decimals
    for rec in records:
        if rec.offset <= plan.last_offset:
            dup_off += rec.event is not None
            continue
        plan.last_offset = rec.offset
        if rec.event is None or rec.customer_id is None:
            continue
        cid, event = rec.customer_id, rec.event
        before = states.get(cid)
        state, ok = apply_event(before, event, ctx.limits)
        if not ok:
            dup_ev += 1
            continue
        applied += 1
        states[cid] = state
        plan.watermark = (event.occurred_ms if plan.watermark is None
                          else max(plan.watermark, event.occurred_ms))
        if not state.has_purchased:
            continue
        t = as_of(plan.watermark, view.other_watermarks)
        days = recency_days(state.last_purchase_ms or 0, t)
        r, f, m = ctx.thresholds.score(days, state.frequency, state.monetary_minor)
        segment = ctx.table.lookup(r, f, m)
        x = features(days, state.frequency, state.monetary_minor / scale)
        cluster = ctx.clusterer.learn_predict_one(
            x, new_customer=before is None or not before.has_purchased)
        new = Assignment(segment=segment.name, cluster=cluster)
        previous = current.get(cid)
        if not is_change(previous, new, features_changed=True):
            continue
        current[cid] = new
        plan.assignments[cid] = Assigned(new.segment, new.cluster)
        plan.changes.append(SegmentChanged(
            change_id=change_id(cid, event.event_id, previous, new),
            customer_id=cid, previous=previous, current=new, recency_days=days,
            frequency=state.frequency, monetary=Decimal(state.monetary_minor).scaleb(
                -ctx.currency_decimals),
            currency=ctx.currency, r_score=r, f_score=f, m_score=m, strategy=segment.strategy,
            cause="refund" if event.kind == "refund" else "purchase",
            cause_event_id=event.event_id, occurred_at=_utc(event.occurred_ms), as_of=_utc(t),
            emitted_at=_utc(ctx.now_ms), rules_version=ctx.table.version,
            thresholds_version=ctx.thresholds.version,
            model_version=ctx.clusterer.n_learned if new.cluster is not None else None))
    plan.outcome = BatchOutcome(applied, dup_off, dup_ev)
    return plan
