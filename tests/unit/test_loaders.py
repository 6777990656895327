"""Files -> events: the Online-Retail rules on a hand-made file (hand-worked expectations),
the event layout with a column mapping, and rejected rows with their reasons."""

from __future__ import annotations

import json
from pathlib import Path

from stream.loaders import LoadOptions, load_file

DATA = Path(__file__).parent.parent / "data"
RETAIL = LoadOptions("online-retail", "UTC", "GBP", 2)


def test_online_retail_rows_become_exactly_the_expected_events_and_rejections():
    rows = list(load_file(DATA / "online_retail_sample.csv", RETAIL))
    assert [(r.row, r.reason) for r in rows if r.event is None] == [
        (3, "duplicate_row"), (8, "missing_customer_id"), (9, "adjustment"),
        (12, "invalid_quantity")]
    events = [r.event for r in rows if r.event is not None]
    got = [(e["customer_id"], e["order_id"], e["type"], e["amount"], e["occurred_at"])
           for e in events]
    assert got == [
        ("17850", "536365", "purchase", "15.30", "2010-12-01T08:26:00+00:00"),
        ("17850", "536365", "purchase", "20.34", "2010-12-01T08:26:00+00:00"),
        ("17850", "536366", "purchase", "11.10", "2010-12-01T08:28:00+00:00"),
        ("13047", "536367", "purchase", "54.08", "2010-12-01T08:34:00+00:00"),
        ("14527", "C536379", "refund", "27.50", "2010-12-01T09:41:00+00:00"),
        ("14527", "536380", "purchase", "34.80", "2010-12-01T09:41:00+00:00"),
        ("15311", "C536383", "refund", "4.65", "2010-12-01T09:49:00+00:00"),
        ("13047", "536384", "purchase", "19.35", "2010-12-02T10:03:00+00:00"),
        ("13047", "536386", "purchase", "0.00", "2010-12-03T11:00:00+00:00"),
        ("14527", "536387", "purchase", "25.50", "2010-12-03T11:30:00+00:00"),
    ]
    assert all(e["currency"] == "GBP" for e in events)
    assert len({e["event_id"] for e in events}) == len(events)
    # loading the file again gives the same ids: a second load is skipped by the worker
    again = [r.event["event_id"] for r in load_file(DATA / "online_retail_sample.csv", RETAIL)
             if r.event is not None]
    assert again == [e["event_id"] for e in events]


def test_timezone_option_moves_naive_invoice_times():
    rows = list(load_file(DATA / "online_retail_sample.csv",
                          LoadOptions("online-retail", "Europe/London", "GBP", 2)))
    first = next(r for r in rows if r.event is not None)
    assert first.event["occurred_at"] == "2010-12-01T08:26:00+00:00"  # GMT in winter
    rows = list(load_file(DATA / "online_retail_sample.csv",
                          LoadOptions("online-retail", "America/New_York", "GBP", 2)))
    first = next(r for r in rows if r.event is not None)
    assert first.event["occurred_at"] == "2010-12-01T08:26:00-05:00"
    assert first.occurred_ms == 1291209960000  # 13:26 UTC


def test_mapped_json_lines_and_bad_lines(tmp_path):
    path = tmp_path / "shop.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "t1", "who": "c1", "basket": "b1", "total": "9.99",
                    "at": "2024-01-02 10:00:00"}),
        "{not json",
        json.dumps({"id": "t2", "basket": "b2", "total": "1.00", "at": "2024-01-02T10:00:00Z"}),
    ]) + "\n")
    opts = LoadOptions("mapped", "UTC", "EUR", 2, {"event_id": "id", "customer_id": "who",
                                                     "order_id": "basket", "amount": "total",
                                                     "occurred_at": "at"})
    rows = list(load_file(path, opts))
    assert [(r.row, r.reason) for r in rows] == [(1, None), (2, "not_json"), (3, "missing_field")]
    assert rows[0].event == {"event_id": "t1", "customer_id": "c1", "order_id": "b1",
                             "amount": "9.99", "occurred_at": "2024-01-02T10:00:00+00:00",
                             "currency": "EUR", "type": "purchase"}
    assert "customer_id" in rows[2].detail


def test_parquet_gives_the_same_events_as_csv(tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(DATA / "online_retail_sample.csv", convert_options=pacsv.ConvertOptions(
        column_types={"InvoiceNo": "string", "CustomerID": "string", "InvoiceDate": "string",
                      "UnitPrice": "string", "StockCode": "string"}))
    pq.write_table(table, tmp_path / "retail.parquet")
    from_csv = [(r.row, r.reason, r.event) for r in load_file(DATA / "online_retail_sample.csv",
                                                              RETAIL)]
    from_parquet = [(r.row, r.reason, r.event) for r in load_file(tmp_path / "retail.parquet",
                                                                  RETAIL)]
    assert [x[:2] for x in from_parquet] == [x[:2] for x in from_csv]
    assert [x[2]["amount"] for x in from_parquet if x[2]] == [x[2]["amount"] for x in from_csv
                                                              if x[2]]


def test_a_bad_row_is_rejected_alone_never_the_file(tmp_path):
    retail = tmp_path / "bad.csv"
    retail.write_bytes(
        b"InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        b"1,a,x,Infinity,12/1/2010 8:26,2.55,1,UK\n"
        b"2,a,x,1,12/1/2010 8:26,NaN,1,UK\n"
        b"3,a,x,1,12/1/2010 8:26,1e400,1,UK\n"
        b"4,a,x,1.9,12/1/2010 8:26,1.85,1,UK\n"
        b"5,a,x,1,13/1/2010 8:26,1.85,1,UK\n"       # day/month never guessed
        b"6,a,x,2,12/1/2010 8:26,1.85,1,UK\n"
        b"7,a,\xff,2,12/1/2010 8:26,1.85,1,UK\n")
    rows = list(load_file(retail, RETAIL))
    assert [(r.row, r.reason) for r in rows] == [
        (1, "invalid_field"), (2, "invalid_field"), (3, "invalid_field"),
        (4, "invalid_quantity"), (5, "invalid_timestamp"), (6, None), (7, "not_utf8")]
    assert rows[5].event["amount"] == "3.70"
    events = tmp_path / "bad.jsonl"
    events.write_text("\n".join(json.dumps(x) for x in [
        {"event_id": "a", "customer_id": "c", "order_id": "o", "amount": "1",
         "occurred_at": "2024-13-01T00:00:00Z"},
        {"event_id": "b", "customer_id": {"a": 1}, "order_id": "o", "amount": "1",
         "occurred_at": "2024-01-01T00:00:00Z"},
        {"event_id": "c", "customer_id": "c", "order_id": "o", "amount": "1",
         "occurred_at": "2024-01-01T10:00:00"},               # naive: read in --timezone
    ]) + "\n")
    rows = list(load_file(events, LoadOptions("event", "Europe/Paris", "EUR", 2)))
    assert [(r.row, r.reason) for r in rows] == [(1, "invalid_timestamp"), (2, "invalid_field"),
                                                 (3, None)]
    assert rows[2].event["occurred_at"] == "2024-01-01T10:00:00+01:00"


def test_a_row_of_another_schema_version_is_rejected(tmp_path):
    """A breaker's case: the loader kept only the event fields, so rows of schema version 2
    were produced as version 1 and applied."""
    good = {"event_id": "e1", "customer_id": "c1", "order_id": "o1", "amount": "9.99",
            "occurred_at": "2024-01-02T10:00:00Z"}
    versions = [1, "1", 2, "2", None, True, 1.0]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps({**good, "event_id": f"e{i}", "schema_version": v})
                              for i, v in enumerate(versions)) + "\n")
    rows = list(load_file(path, LoadOptions("event", "UTC", "USD", 2)))
    assert [r.reason for r in rows] == [None, None] + ["unsupported_schema_version"] * 5


def test_malformed_cdnow_lines_and_a_cut_gzip_file_name_what_is_wrong(tmp_path):
    """A breaker's cases: an amount that is not a number raised decimal.InvalidOperation (a
    traceback from ``load``), a quantity that is not an integer a ValueError naming no line,
    and a gzip file cut short an EOFError (which click reported as "Aborted!")."""
    import gzip

    import pytest

    from stream.cdnow import read_rows

    good = "00001 19970101 1 11.77\n"
    for bad in ("00002 19970101 1 abc", "00002 19970101 x 11.77", "00002 1997111 1 11.77",
                "00002 19970230 1 11.77", "00002 1997-1-1 1 11.77"):
        path = tmp_path / "rows.txt"
        path.write_text(good + bad + "\n")
        with pytest.raises(ValueError, match="CDNOW line 2 is malformed"):
            list(read_rows(path))
    cut = tmp_path / "cut.txt.gz"
    whole = gzip.compress((good * 5000).encode())
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match="not a whole gzip file"):
        list(read_rows(cut))
