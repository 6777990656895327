"""Planning a step without I/O: hand-worked due firing, the flapping guard, and the cap on
due customers read per step."""

from __future__ import annotations

from dataclasses import replace

from state.rfm import Limits, Record, StateEvent, Window
from state.store import PartitionView, StoredCustomer
from stream.planning import PlanContext, plan_step
from stream.scoring import FixedThresholds, Thresholds
from stream.segments import SegmentTable
from stream.timeline import TimePolicy

DAY = 86_400_000
H = 3_600_000
FIXED = Thresholds.fixed(FixedThresholds((30, 90, 180, 365), (2, 3, 5, 8), (1, 2, 3, 4)))


def ctx(dwell_ms: int = DAY) -> PlanContext:
    return PlanContext(SegmentTable.load(), FIXED, None,
                       Limits(), "USD", 2, now_ms=0, policy=TimePolicy(min_dwell_ms=dwell_ms))


def view(customers=None, dues=(), capped=False, as_of=None, wm=None, last_offset=-1):
    return PartitionView(0, 0, last_offset, wm, as_of, None, (), dict(customers or {}),
                         tuple(dues), capped)


def buy(offset, cid, t, order=None, kind="purchase", amount=1000):
    return Record(offset, cid, StateEvent(f"e{offset}", order or f"o{offset}", kind, amount, t))


def segments(plan, cid):
    return [(c.cause, c.current.segment) for c in plan.changes if c.customer_id == cid]


def test_flapping_guard_holds_a_refund_change_and_publishes_it_when_the_dwell_ends():
    recs = [buy(0, "x", 0, "o1"), buy(1, "x", 10 * 60_000, "o2"),
            buy(2, "x", H, "o2", kind="refund")]  # F2 -> F1 within a day of the last change
    plan = plan_step(view(), recs, ctx())
    assert segments(plan, "x") == [("purchase", "New Customers"),
                                   ("purchase", "Potential Loyalists")]
    (write,) = [w for w in plan.writes if w.customer_id == "x"]
    assert write.due_ms == 10 * 60_000 + DAY and write.customer.held_cause == "refund"
    # the next step: another customer's event passes the end of the hold
    later = plan_step(view({"x": write.customer}, dues=[(write.due_ms, "x")],
                           as_of=plan.as_of, wm=plan.watermark, last_offset=2),
                      [buy(3, "y", DAY + H)], ctx())
    assert segments(later, "x") == [("refund", "New Customers")]
    assert [w.customer.held_cause for w in later.writes if w.customer_id == "x"] == [None]
    # without the guard the refund changes the segment at once
    unguarded = plan_step(view(), recs, ctx(dwell_ms=0))
    assert segments(unguarded, "x")[-1] == ("refund", "New Customers")


def test_a_published_segment_the_rule_table_no_longer_has_is_replaced_at_once():
    """A breaker's case: a new rule table that renamed a segment left the customers whose
    change the flapping guard held (here a refund's, within a day of their last change)
    under the old name, which /segments no longer lists, until event time passed the hold
    (on a quiet stream: never). The re-score a new table brings publishes them at once."""
    import tomllib
    from importlib import resources

    data = tomllib.loads(resources.files("stream").joinpath("segments.toml").read_text("utf-8"))
    for seg in data["segment"]:
        if seg["name"] == "Potential Loyalists":
            seg["name"] = "Hopefuls"
    renamed = PlanContext(SegmentTable.from_dict(data), FIXED, None, Limits(), "USD", 2,
                          now_ms=0, policy=TimePolicy(min_dwell_ms=DAY))
    recs = [buy(0, "x", 0, "o1"), buy(1, "x", 10 * 60_000, "o2"),
            buy(2, "x", H, "o2", kind="refund")]
    plan = plan_step(view(), recs, ctx())
    (write,) = [w for w in plan.writes if w.customer_id == "x"]
    assert (write.customer.segment, write.customer.held_cause) == ("Potential Loyalists",
                                                                   "refund")
    # the new table's re-score: x due at the partition's as-of time, no event
    due = view({"x": write.customer}, dues=[(plan.as_of, "x")], as_of=plan.as_of,
               wm=plan.watermark, last_offset=2)
    # published for the table (cause rescore), with the segment the refund had moved it to
    assert segments(plan_step(due, [], renamed), "x") == [("rescore", "New Customers")]
    assert segments(plan_step(due, [], ctx()), "x") == []  # the same table: still held


def test_a_new_table_moves_a_customer_whose_scores_moved_too_at_once():
    """A breaker's case (quintiles, 4,083 of CDNOW's customers): a customer whose scores
    moved since they were published (a threshold refresh's re-score pending), re-scored for
    a new table that puts their published scores elsewhere, was held by the flapping guard
    like any re-score (for good on a quiet stream). The table's part is published at once.
    Here: fixed thresholds, R 5 -> 4 at day 31, inside a 60-day dwell."""
    two = SegmentTable.from_dict({"version": "two", "segment": [
        {"name": "New Customers", "strategy": "a", "rules": [{"r": [1, 1]}]},
        {"name": "Others", "strategy": "b", "rules": [{"r": [2, 5]}]}]})
    (w,) = plan_step(view(), [buy(0, "x", 0)], ctx()).writes
    assert (w.customer.segment, w.customer.scores[0]) == ("New Customers", 5)
    due = view({"x": w.customer}, dues=[(31 * DAY, "x")], as_of=0, wm=0, last_offset=0)
    recs = [buy(1, "y", 31 * DAY)]  # another customer's event moves the as-of to day 31
    dwell = TimePolicy(min_dwell_ms=60 * DAY)
    new = PlanContext(two, FIXED, None, Limits(), "USD", 2, now_ms=0, policy=dwell)
    assert segments(plan_step(due, recs, new), "x") == [("rescore", "Others")]
    # the table it was published under: the guard holds whatever R's drop changes
    assert segments(plan_step(due, recs, ctx(dwell_ms=60 * DAY)), "x") == []


def test_due_customers_fire_in_order_before_the_event_that_passes_them():
    x = StoredCustomer("x", plan_step(view(), [buy(0, "x", 0)], ctx()).writes[0].customer.state,
                       "New Customers", None, (5, 1, 5), 0)
    w = StoredCustomer("w", x.state, "New Customers", None, (5, 1, 5), 0)
    dues = [(31 * DAY, "w"), (31 * DAY, "x")]
    recs = [buy(1, "a", 30 * DAY), buy(2, "b", 31 * DAY), buy(3, "c", 32 * DAY)]
    plan = plan_step(view({"x": x, "w": w}, dues, as_of=0, wm=0, last_offset=0), recs, ctx())
    assert [(c.customer_id, c.cause) for c in plan.changes] == [
        ("a", "purchase"), ("w", "inactivity"), ("x", "inactivity"), ("b", "purchase"),
        ("c", "purchase")]
    # capped: only w was read although more may be due; the plan stops before the event that
    # would pass w's due time, having fired w at that event's as-of time
    capped = plan_step(view({"x": x, "w": w}, dues[:1], capped=True, as_of=0, wm=0,
                            last_offset=0), recs, ctx())
    assert capped.more and capped.consumed == 1 and capped.as_of == 31 * DAY
    assert [(c.customer_id, c.cause) for c in capped.changes] == [
        ("a", "purchase"), ("w", "inactivity")]


def test_planned_changes_are_valid_segment_changed_events():
    """The planner builds and serialises changes without pydantic: the JSON must be the bytes
    pydantic gives for the same fields (the published schema)."""
    from stream.clustering import ClusterModel, CustomerClusterer, features
    from stream.events import SegmentChanged

    model = CustomerClusterer(min_customers=1)
    for d, f, m in [(1, 1, 10.0), (300, 1, 5.0), (2, 9, 900.0)]:
        model.learn_one(features(d, f, m), new_customer=True)
    c = PlanContext(SegmentTable.load(), FIXED, ClusterModel.from_snapshot(model.to_snapshot()),
                    Limits(), "USD", 2, now_ms=5 * DAY, policy=TimePolicy(min_dwell_ms=0))
    recs = [buy(0, "x", 0, amount=1234), buy(1, "x", H, "o2"), buy(2, "x", 2 * H, "o2",
            kind="refund", amount=1), buy(3, "y", 40 * DAY)]
    plan = plan_step(view(), recs, c)
    assert len(plan.changes) >= 3
    assert any(ch.current.cluster is not None for ch in plan.changes)
    for change in plan.changes:  # pydantic is the oracle of the published bytes
        fields = change._asdict()
        fields["previous"] = change.previous and change.previous._asdict()
        fields["current"] = change.current._asdict()
        assert change.to_json() == SegmentChanged(**fields).model_dump_json()


def test_only_a_rescore_of_an_unchanged_state_without_a_window_keeps_its_population():
    """A customer re-scored at its due time, with no event of its own, has the population
    values it was stored with (frequency and monetary are its state's, recency its last
    purchase): the commit leaves its population entries as they are. An event, or a window
    (whose values move with time alone), writes them."""
    state = plan_step(view(), [buy(0, "x", 0, amount=1250)], ctx()).writes[0].customer.state
    x = StoredCustomer("x", state, "New Customers", None, (5, 1, 5), 0)
    stored = view({"x": x, "y": x._replace(customer_id="y")}, [(31 * DAY, "x")], as_of=0,
                  wm=0, last_offset=0)
    plan = plan_step(stored, [buy(1, "y", 40 * DAY, amount=300)], ctx())
    writes = {w.customer_id: w for w in plan.writes}
    assert [c.customer_id for c in plan.changes] == ["x", "y"]  # both evaluated, both moved
    assert writes["x"].population == (0, 1, 1250) and writes["x"].population_kept
    assert writes["y"].population == (40 * DAY, 2, 1550) and not writes["y"].population_kept

    windowed = replace(ctx(), policy=TimePolicy(min_dwell_ms=DAY, window=Window(360, 30)))
    state_w = plan_step(view(), [buy(0, "x", 0, amount=1250)], windowed).writes[0].customer.state
    xw = x._replace(state=state_w)
    plan = plan_step(view({"x": xw}, [(31 * DAY, "x")], as_of=0, wm=0, last_offset=0),
                     [buy(1, "z", 40 * DAY)], windowed)
    (w,) = [w for w in plan.writes if w.customer_id == "x"]
    assert w.population == (0, 1, 1250) and not w.population_kept
