"""Scores 1-5: hand-worked quintiles (with ties), fixed thresholds, and the batch twin against
brute-force counting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.scoring import FixedThresholds, Thresholds, population_scores, quintile_score


def test_hand_worked_quintiles_with_ties():
    # 10 customers' frequencies; 6 have one order (ties), then 2, 2, 3, 7
    freq = [1, 1, 1, 1, 1, 1, 2, 2, 3, 7]
    # worse counts by hand: F=1 -> 0, F=2 -> 6, F=3 -> 8, F=7 -> 9
    # scores: 1 + floor(5*0/10)=1, 1 + floor(30/10)=4, 1 + floor(40/10)=5, 1 + floor(45/10)=5
    assert population_scores(freq, True).tolist() == [1, 1, 1, 1, 1, 1, 4, 4, 5, 5]
    assert [quintile_score(w, 10) for w in (0, 6, 8, 9)] == [1, 4, 5, 5]


def test_hand_worked_recency_lower_is_better():
    days = [0, 0, 30, 400, 10]
    # strictly larger recency: 0 -> 3 worse, 30 -> 1, 400 -> 0, 10 -> 2
    # scores: 1 + 15//5 = 4, 1 + 5//5 = 2, 1, 1 + 10//5 = 3
    assert population_scores(days, False).tolist() == [4, 4, 2, 1, 3]


def test_equal_values_always_equal_scores_and_lone_customer():
    assert population_scores([5, 5, 5], True).tolist() == [1, 1, 1]
    assert population_scores([42], True).tolist() == [1]
    with pytest.raises(ValueError):
        quintile_score(3, 3)


def test_fixed_thresholds_for_the_first_customers():
    t = FixedThresholds((30, 90, 180, 365), (2, 3, 5, 8), (5000, 10000, 25000, 50000))
    # a first customer: bought today, one order of $12.00 -> R5 F1 M1
    assert (t.r(0), t.f(1), t.m(1200)) == (5, 1, 1)
    # 31 days later the same customer is R4 (the boundary is inclusive at 30)
    assert (t.r(30), t.r(31)) == (5, 4)


@given(st.lists(st.integers(0, 20), min_size=1, max_size=60), st.booleans())
@settings(max_examples=200, deadline=None)
def test_population_scores_match_brute_force(values, higher_is_better):
    n = len(values)
    expected = []
    for v in values:
        worse = sum(1 for w in values if (w < v if higher_is_better else w > v))
        expected.append(1 + (5 * worse) // n)
    got = population_scores(np.array(values), higher_is_better).tolist()
    assert got == expected
    assert all(quintile_score(sum(1 for w in values if (w < v if higher_is_better else w > v)), n)
               == g for v, g in zip(values, got, strict=True))


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 9), st.integers(0, 50)),
                min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_population_thresholds_score_like_the_quintile_rule(customers):
    from stream.scoring import Thresholds

    rec, freq, mon = (np.array(x) for x in zip(*customers, strict=True))
    t = Thresholds.from_population(rec, freq, mon)
    got = [t.score(int(a), int(b), int(c)) for a, b, c in customers]
    want = list(zip(population_scores(rec, False).tolist(), population_scores(freq, True).tolist(),
                    population_scores(mon, True).tolist(), strict=True))
    assert got == want


@given(st.lists(st.tuples(st.integers(0, 2 * 10**12), st.integers(0, 50),
                          st.integers(0, 10**7)), min_size=1, max_size=50),
       st.integers(0, 2 * 10**12), st.booleans())
def test_score_many_equals_score_one_by_one(rows, as_of, anchored):
    t = Thresholds("q", (3, 30, 90, 365), (1, 2, 4, 8), (100, 1000, 5000, 20000), 10,
                   as_of if anchored else None)
    last, f, m = (np.array([r[i] for r in rows]) for i in range(3))
    got = t.score_many(last, as_of, f, m).tolist()
    assert got == [list(t.score(t.scoring_days(a, as_of), b, c)) for a, b, c in rows]


DAY = 86_400_000
bounds4 = st.lists(st.integers(-1, 12), min_size=4, max_size=4).map(sorted)
# times near whole days, where the flooring of recency flips
near_days = st.builds(lambda d, off: d * DAY + off, st.integers(-3, 30), st.sampled_from(
    [-1, 0, 1, DAY // 2]))


@given(st.lists(st.tuples(near_days, st.integers(0, 14), st.integers(0, 14)),
                min_size=1, max_size=40),
       bounds4, bounds4, bounds4, bounds4, bounds4, bounds4,
       near_days.map(abs), near_days.map(abs), st.booleans())
@settings(max_examples=500, deadline=None)
def test_moved_ranges_hold_exactly_the_customers_whose_scores_differ(
        customers, r_old, r_new, f_old, f_new, m_old, m_new, anchor, step, unanchored):
    # bounds in days near the customers' values, anchors a few days apart; a customer's
    # last purchase may lie after either anchor (events ahead of the as-of time)
    old = Thresholds("o", tuple(sorted(r_old, reverse=True)), tuple(f_old), tuple(m_old), 9,
                     None if unanchored else anchor)
    new = Thresholds("n", tuple(sorted(r_new, reverse=True)), tuple(f_new), tuple(m_new), 9,
                     anchor + step)
    ranges = old.moved_ranges(new)
    values = {"last": 0, "freq": 1, "mon": 2}
    for c in customers:
        inside = any(lo <= c[values[kind]] <= hi for kind, lo, hi in ranges)
        # brute force, one customer at a time; the old thresholds score at the old anchor
        before = old.score(old.scoring_days(c[0], anchor), c[1], c[2])
        after = new.score(new.scoring_days(c[0], anchor + step), c[1], c[2])
        assert inside == (unanchored or before != after), (c, before, after, ranges)
