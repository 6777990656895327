"""The segment rule table: the default grid cell by cell, and the loader's checks."""

from __future__ import annotations

import pytest

from oracles import GRID
from stream.segments import SegmentTable, SegmentTableError


def test_default_table_matches_the_hand_written_grid_for_all_125_triples():
    t = SegmentTable.load()
    for r in range(1, 6):
        for f in range(1, 6):
            for m in range(1, 6):
                assert t.lookup(r, f, m).name == GRID[r][f - 1], (r, f, m)
    assert len(t.segments) == 10
    assert "win-back" in t.lookup(1, 3, 1).strategy.lower()
    assert "loyalty" in t.lookup(5, 5, 5).strategy.lower()


def test_lookup_many_matches_the_hand_written_grid():
    t = SegmentTable.load()
    triples = [(r, f, m) for r in range(1, 6) for f in range(1, 6) for m in range(1, 6)]
    names = list(t.segments)
    got = t.lookup_many(triples).tolist()
    assert [names[i] for i in got] == [GRID[r][f - 1] for r, f, _ in triples]


def _table(rules_a, rules_b):
    return {"version": "x", "segment": [
        {"name": "A", "strategy": "a", "rules": rules_a},
        {"name": "B", "strategy": "b", "rules": rules_b}]}


def test_gap_and_overlap_are_refused():
    with pytest.raises(SegmentTableError, match="match no segment"):
        SegmentTable.from_dict(_table([{"r": [1, 4]}], [{"r": [5, 5], "f": [1, 4]}]))
    with pytest.raises(SegmentTableError, match="match both"):
        SegmentTable.from_dict(_table([{"r": [1, 5]}], [{"r": [5, 5], "m": [3, 3]}]))
    with pytest.raises(SegmentTableError, match="within 1..5"):
        SegmentTable.from_dict(_table([{"r": [0, 5]}], []))
    ok = SegmentTable.from_dict(_table([{"r": [1, 4]}], [{"r": [5, 5]}]))
    assert ok.lookup(5, 1, 1).name == "B" and ok.lookup(4, 5, 5).name == "A"


def test_scores_outside_range_raise():
    with pytest.raises(KeyError):
        SegmentTable.load().lookup(0, 1, 1)
