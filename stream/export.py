"""Export every customer scored at one as-of time: recency, scores, segment and cluster.

Scores, segment and cluster are computed at the export's as-of time (README, "RFM
definitions"): the population quintiles of all customers at that moment (fixed thresholds
below the minimum population), the segment rule table, and the latest clustering model
snapshot.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from state.rfm import Window, frequency_monetary, recency_days
from state.store import RedisStore, StoredCustomer
from stream.clustering import ClusterModel, features, predict_many
from stream.scoring import FixedThresholds, Thresholds
from stream.segments import SegmentTable
from stream.settings import Settings

COLUMNS = ("customer_id", "recency_days", "frequency", "monetary", "r_score", "f_score",
           "m_score", "segment", "cluster")


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One exported customer; ``monetary`` in currency units, ``cluster`` None when unknown."""

    customer_id: str
    recency_days: int
    frequency: int
    monetary: Decimal
    r_score: int
    f_score: int
    m_score: int
    segment: str
    cluster: int | None


def score_all(customers: Sequence[StoredCustomer], as_of_ms: int, table: SegmentTable,
              thresholds: FixedThresholds, min_population: int,
              model: dict[str, Any] | None, currency_decimals: int = 2,
              window: Window | None = None) -> list[ExportRow]:
    """Score customers that have purchased at ``as_of_ms`` (refund-only ones are left out);
    frequency and monetary over ``window`` when given."""
    buyers = [c for c in customers if c.state.has_purchased]
    rec = np.array([recency_days(c.state.last_purchase_ms or 0, as_of_ms) for c in buyers],
                   dtype=np.int64)
    fm = [frequency_monetary(c.state, as_of_ms, window) for c in buyers]
    freq = np.array([x[0] for x in fm], dtype=np.int64)
    mon = np.array([x[1] for x in fm], dtype=np.int64)
    # the worker's scoring mechanism, with thresholds of the whole population at as_of_ms
    scorer = (Thresholds.from_population(rec, freq, mon) if len(buyers) >= min_population
              else Thresholds.fixed(thresholds))
    scores = [scorer.score(int(a), int(b), int(c)) for a, b, c in zip(rec, freq, mon, strict=True)]
    r, f, m = (np.array([s[i] for s in scores], dtype=np.int64) for i in range(3))
    scale = 10 ** currency_decimals
    if model is not None and buyers:
        x = np.array([list(features(int(a), int(b), int(c) / scale).values())
                      for a, b, c in zip(rec, freq, mon, strict=True)])
        clusters = predict_many(model, x)
    else:
        clusters = np.full(len(buyers), -1, dtype=np.int64)
    return [ExportRow(c.customer_id, int(rec[i]), int(freq[i]),
                      Decimal(int(mon[i])).scaleb(-currency_decimals), int(r[i]), int(f[i]),
                      int(m[i]), table.lookup(int(r[i]), int(f[i]), int(m[i])).name,
                      None if clusters[i] < 0 else int(clusters[i]))
            for i, c in enumerate(buyers)]


async def load_customers(store: RedisStore, partitions: Iterable[int],
                         unreadable: list[tuple[str, str]] | None = None
                         ) -> list[StoredCustomer]:
    """Every stored customer of the namespace (``unreadable``: see
    :meth:`RedisStore.iter_customers`)."""
    out: list[StoredCustomer] = []
    for p in partitions:
        async for page in store.iter_customers(p, unreadable=unreadable):
            out.extend(page)
    return out


async def load_model(store: RedisStore) -> dict[str, Any] | None:
    """The latest clustering model snapshot (checked: :class:`ClusterModel` reads it)."""
    text = await store.load_model()
    if text is None:
        return None
    snap: dict[str, Any] = json.loads(text)
    ClusterModel.from_snapshot(snap)
    return snap


def write_csv(rows: Iterable[ExportRow], path: Path) -> int:
    """Write rows (sorted by customer id) to ``path``; returns the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for row in sorted(rows, key=lambda r: r.customer_id):
            w.writerow([row.customer_id, row.recency_days, row.frequency, f"{row.monetary}",
                        row.r_score, row.f_score, row.m_score, row.segment,
                        "" if row.cluster is None else row.cluster])
            n += 1
    return n


def write_jsonl(values: Iterable[bytes], path: Path) -> int:
    """Write JSON values (a topic's record values) one per line, as they are (the bytes
    ``rfm-stream changes`` prints); a value spanning lines is written again compact, in its
    own key order. Returns the number written.

    Raises
    ------
    ValueError
        When a value is not JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "wb") as fh:
        for v in values:
            doc = json.loads(v)
            if b"\n" in v or b"\r" in v:
                v = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
            fh.write(v + b"\n")
            n += 1
    return n


async def scored_customers(settings: Settings, as_of_ms: int | None = None,
                           unreadable: list[tuple[str, str]] | None = None
                           ) -> tuple[list[ExportRow], int, dict[str, Any] | None]:
    """Every stored customer scored at ``as_of_ms`` (default: the latest as-of time of the
    partitions): ``(rows, as-of time, model snapshot or None)``. With ``unreadable``, a
    customer whose stored value cannot be decoded is left out and listed there as
    ``(customer id, reason)``; without it, it raises ``ValueError``.

    Raises
    ------
    RuntimeError
        When nothing was applied yet and no as-of time is given.
    """
    from stream.runner import store_for

    store = store_for(settings)
    try:
        parts = range(settings.partitions)
        t = as_of_ms if as_of_ms is not None else await store.as_of(parts)
        if t is None:
            raise RuntimeError("no event was applied: nothing to export")
        customers = await load_customers(store, parts, unreadable)
        model = await load_model(store)
    finally:
        await store.client.aclose()
    rows = score_all(customers, t, SegmentTable.load(settings.segment_table),
                     settings.fixed_thresholds(), settings.min_population, model,
                     settings.currency_decimals, settings.time_policy().window)
    return rows, t, model


async def export_customers(settings: Settings, out: Path, as_of_ms: int | None = None,
                           unreadable: list[tuple[str, str]] | None = None
                           ) -> tuple[int, int]:
    """Score every customer at ``as_of_ms`` (see :func:`scored_customers`, also for
    ``unreadable``) and write them to ``out`` (``.csv`` or ``.parquet``); returns (rows,
    as-of).

    Raises
    ------
    RuntimeError
        When nothing was applied yet and no as-of time is given.
    ValueError
        For another file extension.
    """
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"export to .csv or .parquet, not {out.suffix!r}")
    rows, t, _ = await scored_customers(settings, as_of_ms, unreadable)
    if out.suffix.lower() == ".csv":
        return write_csv(rows, out), t
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r.customer_id)
    table = pa.table({c: [getattr(r, c) if c != "monetary" else str(r.monetary) for r in rows]
                      for c in COLUMNS})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return len(rows), t
