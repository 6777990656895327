"""Plan one step of one partition: per event, in offset order, the new RFM state, scores,
segment, cluster and segment change; and, as the as-of time advances, the customers due for a
re-score without an event (inactivity, window expiry, flapping guard, threshold refresh).
Pure.

Given the same starting view, records, thresholds and model, the plan is the same: that is what
makes a replay of one partition reproduce the same segment changes, whatever the batch sizes.
Due customers fire in (due time, customer id) order just before the event whose watermark
passes their due time, at that event's as-of time. The plan is committed by one atomic script
(``state/lua/commit.lua``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from decimal import Decimal

from state.rfm import (
    BatchOutcome,
    Limits,
    Record,
    StateEvent,
    apply_event,
    frequency_monetary,
    recency_days,
    window_expiry_ms,
)
from state.store import CustomerWrite, PartitionView, StoredCustomer
from stream.changes import Assigned, Change, change_id, changes
from stream.clustering import ClusterModel
from stream.scoring import Thresholds
from stream.segments import SegmentTable
from stream.timeline import TimePolicy, earliest, utc


@dataclass(frozen=True, slots=True)
class PlanContext:
    """What scoring needs besides the data: rules, thresholds, the clustering model snapshot
    (None: no cluster ids), currency, time policy and the wall clock (for idleness and
    ``emitted_at`` only). ``rules_generation``: the commit sequence at which the partition
    took up ``table`` (part of the ids of the changes the table itself makes: switching
    tables back and forth at one as-of time makes the same transitions again)."""

    table: SegmentTable
    thresholds: Thresholds
    model: ClusterModel | None
    limits: Limits
    currency: str
    currency_decimals: int
    now_ms: int
    policy: TimePolicy = TimePolicy()
    replay: bool = False
    rules_generation: int = 0


@dataclass
class Plan:
    """A step's outcome before it is committed.

    ``consumed``: how many of the records it covers (the rest go to the next step: it stopped
    where more customers may be due than were read); ``more``: it stopped early.
    """

    consumed: int = 0
    more: bool = False
    writes: list[CustomerWrite] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    outcome: BatchOutcome = BatchOutcome()
    last_offset: int = -1
    watermark: int | None = None
    as_of: int | None = None
    applied_any: bool = False


def _segment(c: StoredCustomer | None) -> str | None:
    return None if c is None else c.segment


class _Planner:
    """The working state of one plan (customers as they stand, their due times, the heap)."""

    def __init__(self, view: PartitionView, ctx: PlanContext):
        self.view, self.ctx = view, ctx
        self.book: dict[str, StoredCustomer | None] = dict(view.customers)
        self.due: dict[str, int | None] = {cid: t for t, cid in view.dues}
        self.heap: list[tuple[int, str]] = list(view.dues)
        heapq.heapify(self.heap)
        self.touched: dict[str, tuple[int, int, int] | None] = {}
        self.due_only: set[str] = set()
        self.barrier = view.dues[-1][0] if view.dues_capped and view.dues else None
        self.plan = Plan(last_offset=view.last_offset, watermark=view.watermark,
                         as_of=view.as_of)

    # --- time ----------------------------------------------------------------------------------
    def schedule_rescore(self, customer_ids: list[str], anchor_ms: int) -> None:
        """Make customers due from ``anchor_ms``, ``rescore_spacing_ms`` apart (id order)."""
        spacing = self.ctx.policy.rescore_spacing_ms
        for k, cid in enumerate(sorted(customer_ids)):
            t = anchor_ms + k * spacing
            current = self.due.get(cid)
            if current is not None and current <= t:
                continue
            self.due[cid] = t
            heapq.heappush(self.heap, (t, cid))
            if cid not in self.touched:
                self.due_only.add(cid)

    def advance(self, candidate: int | None) -> bool:
        """Move the as-of time to ``candidate`` and fire what is due by then. False when it
        stopped at the barrier (more may be due than were read)."""
        if candidate is None:
            return True
        p = self.plan
        p.as_of = candidate if p.as_of is None else max(p.as_of, candidate)
        limit = p.as_of if self.barrier is None else min(p.as_of, self.barrier)
        while self.heap and self.heap[0][0] <= limit:
            t, cid = heapq.heappop(self.heap)
            if self.due.get(cid) == t:  # else superseded
                self.evaluate(cid, None, due_ms=t)
        # at the barrier itself, unread customers may be due at the same time (ties)
        return self.barrier is None or p.as_of < self.barrier

    # --- one customer --------------------------------------------------------------------------
    def evaluate(self, cid: str, event: StateEvent | None, due_ms: int | None = None) -> None:
        """Score a customer at the as-of time; publish a change if there is one (and the
        flapping guard lets it through); schedule its next due time."""
        ctx, p = self.ctx, self.plan
        c = self.book.get(cid)
        assert p.as_of is not None
        if c is None:  # due, but erased since
            self.due[cid] = None
            self.due_only.add(cid)
            return
        s, t = c.state, p.as_of
        self.due_only.discard(cid)
        if s.last_purchase_ms is None:  # refunds only: kept, never scored
            self.touched[cid], self.due[cid] = None, None
            return
        days = recency_days(s.last_purchase_ms, t)
        f, m = frequency_monetary(s, t, ctx.policy.window)
        scores = ctx.thresholds.score(ctx.thresholds.scoring_days(s.last_purchase_ms, t), f, m)
        segment = ctx.table.lookup(*scores)
        if event is None and c.segment == segment.name:
            cluster = c.cluster  # no cluster-only change without the customer's own event
        elif ctx.model is not None:
            cluster = ctx.model.predict_rfm(days, f, m / 10 ** ctx.currency_decimals)
        else:
            cluster = None
        # a new rule table's doing, an operator's decision, published at once like a purchase:
        # the table puts the published scores in another segment (when no change is held,
        # the stored scores are the published ones), or no longer has the published segment
        by_table = (event is None and c.segment is not None and c.segment != segment.name
                    and (c.segment not in ctx.table.segments
                         or (c.held_cause is None and c.scores is not None
                             and ctx.table.lookup(*c.scores).name != c.segment)))
        cause = "rescore" if by_table else self._cause(event, c, scores)
        hold = (None if cause == "purchase" or by_table
                else ctx.policy.dwell_until(c.changed_ms))
        deferred = None
        published, changed_ms, held = (c.segment, c.cluster), c.changed_ms, c.held_cause
        if changes(c.segment, c.cluster, segment.name, cluster, event is not None):
            if c.segment is not None and hold is not None and t < hold:
                deferred, held = hold, cause  # the flapping guard: decided again when it ends
            else:
                ref = f"rules{ctx.rules_generation}@{due_ms}" if by_table else None
                p.changes.append(self._change(cid, c, segment.name, cluster, scores,
                                              segment.strategy, days, f, m, cause, event,
                                              due_ms, ref))
                published, changed_ms, held = (segment.name, cluster), t, None
        else:
            held = None  # back where it was published (if held): nothing to tell
        # scores as of this evaluation
        self.book[cid] = StoredCustomer(cid, s, published[0], published[1], scores, changed_ms,
                                        held)
        nxt = earliest(ctx.thresholds.next_recency_change_ms(s.last_purchase_ms, t),
                       window_expiry_ms(s, t, ctx.policy.window), deferred)
        self.due[cid] = nxt
        if nxt is not None:
            heapq.heappush(self.heap, (nxt, cid))
        self.touched[cid] = (s.last_purchase_ms, f, m)

    def _cause(self, event: StateEvent | None, c: StoredCustomer,
               scores: tuple[int, int, int]) -> str:
        if event is not None:
            return event.kind
        if c.held_cause is not None:
            return c.held_cause
        if self.ctx.thresholds.anchor_ms is not None or c.scores is None:
            return "rescore"
        return "rescore" if any(a > b for a, b in zip(scores, c.scores, strict=True)) \
            else "inactivity"

    def _change(self, cid: str, c: StoredCustomer, segment: str, cluster: int | None,
                scores: tuple[int, int, int], strategy: str, days: int, f: int, m: int,
                cause: str, event: StateEvent | None, due_ms: int | None,
                ref: str | None = None) -> Change:
        ctx, t = self.ctx, self.plan.as_of
        assert t is not None
        if ref is None:
            ref = event.event_id if event is not None else f"{cause}@{due_ms}"
        previous = None if c.segment is None else Assigned(c.segment, c.cluster)
        new = Assigned(segment, cluster)
        return Change(
            change_id=change_id(cid, ref, previous, new), customer_id=cid, previous=previous,
            current=new, recency_days=days, frequency=f,
            monetary=Decimal(m).scaleb(-ctx.currency_decimals), currency=ctx.currency,
            r_score=scores[0], f_score=scores[1], m_score=scores[2], strategy=strategy,
            cause=cause,
            cause_event_id=None if event is None else event.event_id,
            occurred_at=utc(event.occurred_ms if event is not None else due_ms or t),
            as_of=utc(t), emitted_at=utc(ctx.now_ms), rules_version=ctx.table.version,
            thresholds_version=ctx.thresholds.version,
            model_version=ctx.model.version if new.cluster is not None and ctx.model else None,
            replay=ctx.replay)

    # --- the step ------------------------------------------------------------------------------
    def run(self, records: list[Record], own_active: bool) -> Plan:
        ctx, view, p = self.ctx, self.view, self.plan
        # the as-of time a record brings (advance() never moves it back): TimePolicy.as_of
        # with the other partitions' clocks fixed for the step
        if ctx.policy.mode == "wall_clock":
            def clock(own: int | None, own_active: bool) -> int | None:
                return ctx.now_ms
        else:
            clock = ctx.policy.clock(view.others, ctx.now_ms)
        applied = dup_off = dup_ev = 0
        stopped = False
        for i, rec in enumerate(records):
            if rec.offset <= p.last_offset:
                dup_off += rec.event is not None
                p.consumed = i + 1
                continue
            wm = p.watermark
            if rec.event is not None:
                t = rec.event.occurred_ms
                wm = t if wm is None else max(wm, t)
            if not self.advance(clock(wm, True)):
                stopped = True
                break
            p.consumed, p.last_offset = i + 1, rec.offset
            if rec.event is None or rec.customer_id is None:
                continue
            cid, event = rec.customer_id, rec.event
            before = self.book.get(cid)
            state, ok = apply_event(before.state if before else None, event, ctx.limits,
                                    ctx.policy.window)
            if not ok:
                dup_ev += 1
                continue
            applied += 1
            p.watermark, p.applied_any = wm, True
            self.book[cid] = (before._replace(state=state) if before is not None
                              else StoredCustomer(cid, state))
            self.evaluate(cid, event)
        if not stopped:
            stopped = not self.advance(clock(p.watermark, own_active))
        p.more = stopped
        p.outcome = BatchOutcome(applied, dup_off, dup_ev)
        read = view.customers
        # a customer re-scored without an event of its own keeps its state, and without a
        # window its population values (a function of the state alone) are those stored:
        # no population write (most of a backlog's re-scores)
        # (the values stored before are the read state's then: the chunked layout finds the
        # customer by them; with a window they are unknown, and that layout refuses windows)
        keep = ctx.policy.window is None
        for cid, pop in self.touched.items():
            c, r = self.book[cid], read.get(cid)
            kept = keep and pop is not None and r is not None and c.state is r.state
            before = (None if not keep or r is None or r.state.last_purchase_ms is None
                      else (r.state.last_purchase_ms, r.state.frequency, r.state.monetary_minor))
            p.writes.append(CustomerWrite(cid, self.due.get(cid), c, pop, _segment(r), kept,
                                          before))
        p.writes += [CustomerWrite(cid, self.due.get(cid)) for cid in sorted(self.due_only)]
        return p


def plan_step(view: PartitionView, records: list[Record], ctx: PlanContext,
              rescore: list[str] | None = None, own_active: bool = True) -> Plan:
    """Plan one step: fold ``records`` (ascending offsets) into the customers' states, score
    each customer an applied event touches, and fire due customers as the as-of time advances.

    Records at or below ``view.last_offset`` are skipped (redelivered); a duplicate
    ``event_id`` is skipped by the fold. ``rescore``: customers to re-score after a threshold
    refresh (due from ``ctx.thresholds.anchor_ms``, or the view's as-of time for fixed
    thresholds, spaced by the policy); their states must
    be in ``view.customers``. ``own_active``: whether this partition's own watermark holds the
    as-of time (False for a timer sweep of a partition idle itself).

    A plan may stop before the end of ``records`` (``Plan.more``) when more customers may be
    due than the view read; the caller commits it and plans the rest from a fresh view.
    """
    planner = _Planner(view, ctx)
    if rescore:
        # quintiles: from their anchor; fixed thresholds (a population that fell below the
        # minimum): from the as-of time they take over at
        anchor = ctx.thresholds.anchor_ms if ctx.thresholds.anchor_ms is not None else view.as_of
        if anchor is None:
            raise ValueError("rescore needs anchored thresholds or an as-of time")
        planner.schedule_rescore(rescore, anchor)
    return planner.run(records, own_active)
