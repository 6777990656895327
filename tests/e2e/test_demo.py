"""``rfm-stream demo`` end to end on the CDNOW data (real broker, Redis and worker), checked
against an independent pandas group-by over the same file: all 23,570 customers."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from oracles import GRID, cdnow_frame, cdnow_rfm
from stream.events import SegmentChanged


def test_demo_writes_exports_equal_to_the_pandas_oracle(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "stream", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Champions" in proc.stdout and "Dead letters: 0" in proc.stdout

    got = pd.read_csv(out / "customers.csv", dtype={"customer_id": str, "monetary": str})
    assert len(got) == 23_570
    got = got.set_index("customer_id").sort_index()
    want = cdnow_rfm("1998-06-30").sort_index()
    assert list(got.index) == list(want.index)
    assert (got["recency_days"] == want["recency_days"]).all()
    assert (got["frequency"] == want["frequency"]).all()
    cents = got["monetary"].map(lambda s: int(s.replace(".", "")))
    assert (cents == want["monetary_cents"]).all()
    for col in ("r_score", "f_score", "m_score"):
        assert (got[col] == want[col]).all(), col
    expected_segment = [GRID[r][f - 1] for r, f in zip(want["r_score"], want["f_score"],
                                                       strict=True)]
    assert list(got["segment"]) == expected_segment
    assert got["cluster"].notna().all() and set(got["cluster"]) <= set(range(5))

    lines = (out / "segment_changes.jsonl").read_text().splitlines()
    changes = [SegmentChanged.model_validate(json.loads(line)) for line in lines]
    assert {c.customer_id for c in changes} == set(want.index)
    first: dict[str, SegmentChanged] = {}
    for c in changes:
        first.setdefault(c.customer_id, c)
    assert all(c.previous is None for c in first.values())
    assert len({c.change_id for c in changes}) == len(changes)

    # the stream itself (one partition: publication order per customer), against rules that
    # do not come from the pipeline: each change starts where the customer's last one ended,
    # changes something, moves the cluster alone only for the customer's own event, and a
    # purchase's change names a purchase of that customer on a day of the file
    days = cdnow_frame().groupby("customer_id")["date"].agg(set)
    last: dict[str, SegmentChanged] = {}
    for c in changes:
        before = last.get(c.customer_id)
        assert c.previous == (before.current if before else None), c
        assert c.previous != c.current, c
        if c.previous is not None and c.previous.segment == c.current.segment:
            assert c.cause in ("purchase", "refund"), c
        if c.cause == "purchase":
            assert c.cause_event_id is not None, c
            assert c.occurred_at.strftime("%Y%m%d") in days[c.customer_id], c
        last[c.customer_id] = c
