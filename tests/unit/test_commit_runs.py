"""state.store.commit_runs, hand-worked: what commit.lua is told to write for each layout of
the populations (the sorted sets are written by id; the chunked ones find a customer by the
values it is stored with, so a changed value is a removal and an addition, an unchanged one
nothing)."""

from __future__ import annotations

from state.store import commit_runs

ROWS = [
    # id, due, population, value, old segment, new segment, old population
    ("a", "", (10, 2, 500), b"va", "", "New", None),  # a new customer
    ("b", "7", (20, 3, 900), b"vb", "X", "Y", (15, 3, 800)),  # last and monetary moved
    ("c", "", (), b"vc", "Y", "Y", (5, 1, 1)),  # re-scored, populations kept as stored
    ("d", "", None, b"vd", "", "", None),  # refunds only: in no population
    ("e", "", None, b"ve", "Z", "", (1, 1, 100)),  # no longer scored
]
VALUES = ["a", b"va", "b", b"vb", "c", b"vc", "d", b"vd", "e", b"ve"]
DELTA = ["New", "1", "X", "-1", "Y", "1", "Z", "-1"]


def test_the_sorted_sets_are_written_by_id():
    (run,) = commit_runs(ROWS)
    assert run == [
        ["7", "b"], [], ["a", "c", "d", "e"],  # due: ZADD, ZADD LT, ZREM
        ["d", "e"],  # population ZREM
        ["10", "a", "20", "b"], ["2", "a", "3", "b"], ["500", "a", "900", "b"],
        VALUES,
        [], [], [],  # no chunked removals
        DELTA]


def test_the_chunked_populations_move_only_the_values_that_changed():
    (run,) = commit_runs(ROWS, chunked=True)
    assert run == [
        ["7", "b"], [], ["a", "c", "d", "e"],
        [],  # no ZREM by id
        ["10", "a", "20", "b"], ["2", "a"], ["500", "a", "900", "b"],  # b's frequency stays
        VALUES,
        ["15", "b", "1", "e"], ["1", "e"], ["800", "b", "100", "e"],  # removed at old values
        DELTA]


def test_a_customer_written_twice_starts_a_run_that_removes_its_first_values():
    rows = [("a", "", (10, 1, 100), b"v1", "", "S", None),
            ("a", "", (20, 2, 300), b"v2", "S", "T", (10, 1, 100))]
    first, second = commit_runs(rows, chunked=True)
    assert first[4:7] == [["10", "a"], ["1", "a"], ["100", "a"]] and first[8:11] == [[], [], []]
    assert second[4:7] == [["20", "a"], ["2", "a"], ["300", "a"]]
    assert second[8:11] == [["10", "a"], ["1", "a"], ["100", "a"]]
    assert first[11] == ["S", "1"] and second[11] == ["S", "-1", "T", "1"]


def test_chunked_values_above_2_to_the_53_count_as_its_largest_exact_integer():
    """A chunk's fence holds 16 digits (and Redis's scores are exact to 2^53): a monetary
    total of 10^16 minor units is ranked, and found again, as 2^53 - 1."""
    rows = [("w", "", (5, 1, 10**16 + 7), b"v", "", "S", (5, 1, 10**16))]
    (run,) = commit_runs(rows, chunked=True)
    assert run[6] == [] and run[10] == []  # both clamp to 9007199254740991: nothing moves
    (run,) = commit_runs([("w", "", (5, 1, 10**16), b"v", "", "S", (5, 1, 100))], chunked=True)
    assert run[6] == ["9007199254740991", "w"] and run[10] == ["100", "w"]
