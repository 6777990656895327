"""Files -> purchase events: CSV, JSON Lines or Parquet, in three known layouts or with a
column mapping. Every row becomes an event (a ``PurchaseRecorded`` JSON object) or a rejected
row with a reason; nothing is dropped silently.

Layouts (``--format``):

``event``
    The project's own event JSON (``docs/schemas``), one object per row/line.
``cdnow``
    The CDNOW master file (whitespace separated; ``stream/cdnow.py``).
``online-retail``
    The UCI "Online Retail" invoice-line layout (``InvoiceNo, StockCode, Description, Quantity,
    InvoiceDate, UnitPrice, CustomerID, Country``), one row per invoice line (Chen, Sain and
    Guo, "Data mining for the online retail industry", J. Database Marketing & Customer
    Strategy Management 19, 2012). Rules:

    - a line becomes a purchase of ``Quantity x UnitPrice`` (rounded half-even to the
      currency's minor unit) in order ``InvoiceNo``; lines of one invoice count once in
      frequency;
    - an invoice starting with ``C`` is a cancellation: a refund of ``|Quantity| x UnitPrice``
      naming its own invoice number (the data names no original invoice), so it reduces
      monetary and never frequency;
    - an invoice starting with ``A`` is a bad-debt adjustment: rejected (``adjustment``);
    - no ``CustomerID``: rejected (``missing_customer_id``); a non-positive or fractional
      quantity (``invalid_quantity``), a negative price (``invalid_amount``), an unreadable
      number (``invalid_field``) or date (``invalid_timestamp``): rejected with its reason;
    - ``InvoiceDate`` is month/day/year (as in the UCI file) or ISO-8601, with no time zone:
      read in ``--timezone`` (default UTC); amounts are in ``--currency`` (default GBP);
    - ``CustomerID`` is read as an integer id (``17850.0`` -> ``17850``).

Event ids are a hash of the row's content (layout, columns, values), so loading the same file
twice gives the same ids (the worker skips them), and exact duplicate rows collapse into one
event: two identical invoice lines count once (documented in README).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from stream import cdnow
from stream.events import IN_SCHEMA_VERSION
from stream.validation import epoch_ms

FORMATS = ("event", "cdnow", "online-retail", "mapped")
RETAIL_COLUMNS = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate",
                  "UnitPrice", "CustomerID", "Country")
EVENT_FIELDS = ("event_id", "customer_id", "order_id", "type", "amount", "currency",
                "occurred_at")


@dataclass(frozen=True, slots=True)
class Loaded:
    """One input row's outcome: an event (JSON-able dict) or a rejection (reason, detail).

    ``row``: 1-based row number in the file (header excluded).
    """

    row: int
    event: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""

    @property
    def occurred_ms(self) -> int:
        """The event time in epoch ms, floored exactly as the worker does (no float)."""
        assert self.event is not None
        return epoch_ms(datetime.fromisoformat(self.event["occurred_at"]))


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How rows are read: layout, time zone of naive times, currency and its decimals, and a
    column mapping (event field -> file column) for ``mapped``."""

    format: str = "event"
    timezone: str = "UTC"
    currency: str = "USD"
    currency_decimals: int = 2
    mapping: Mapping[str, str] | None = None


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV (header line), JSON Lines or Parquet file as dicts of strings/values.

    Raises
    ------
    ValueError
        For an unknown file extension.
    """
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        # a byte that is not UTF-8 rejects its row (not_utf8), not the file
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
            for row in csv.DictReader(fh):
                if any("\ufffd" in str(v) for v in row.values()) or None in row:
                    yield {"__error__": "not_utf8" if any("\ufffd" in str(v)
                                                          for v in row.values())
                           else "invalid_field", "__detail__": "row is not valid UTF-8 CSV"}
                else:
                    yield row
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield {"__error__": f"not JSON: {exc}"}
                        continue
                    yield obj if isinstance(obj, dict) else {"__error__": "not a JSON object"}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            yield from batch.to_pylist()
    else:
        raise ValueError(f"unknown file type {suffix!r}: use .csv, .jsonl or .parquet")


def _hash_id(prefix: str, row: Mapping[str, Any], columns: Iterable[str]) -> str:
    text = json.dumps([prefix, *((c, str(row.get(c, ""))) for c in columns)],
                      ensure_ascii=False)
    return f"{prefix}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:32]}"


def _parse_time(text: str, zone: ZoneInfo) -> datetime:
    """ISO-8601, or the UCI layout's month/day/year; a time without a zone is read in
    ``zone``. Raises ValueError (never guesses day/month order)."""
    text = text.strip()
    for fmt in ("%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S"):
        try:
            t = datetime.strptime(text, fmt)  # noqa: DTZ007 - the zone is set below
            break
        except ValueError:
            continue
    else:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.year < 1970:
        raise ValueError(f"{text!r} is before 1970")
    return t.replace(tzinfo=zone) if t.tzinfo is None else t


def retail_row(n: int, row: Mapping[str, Any], opts: LoadOptions) -> Loaded:
    """One Online-Retail invoice line -> a purchase, a refund, or a rejection (module rules)."""
    invoice = str(row.get("InvoiceNo") or "").strip()
    customer = str(row.get("CustomerID") or "").strip()
    if not invoice:
        return Loaded(n, reason="missing_field", detail="InvoiceNo is empty")
    if invoice.upper().startswith("A"):
        return Loaded(n, reason="adjustment", detail=f"invoice {invoice} is a bad-debt adjustment")
    if not customer or customer.lower() == "nan":
        return Loaded(n, reason="missing_customer_id", detail=f"invoice {invoice} has no CustomerID")
    if customer.endswith(".0"):
        customer = customer[:-2]
    try:
        when = _parse_time(str(row.get("InvoiceDate") or ""), ZoneInfo(opts.timezone))
    except (ValueError, TypeError, OverflowError) as exc:
        return Loaded(n, reason="invalid_timestamp", detail=f"InvoiceDate: {exc}")
    try:
        qty = Decimal(str(row.get("Quantity")).strip())
        price = Decimal(str(row.get("UnitPrice")).strip())
        if not (qty.is_finite() and price.is_finite()):
            raise InvalidOperation("not a finite number")
        unit = Decimal(1).scaleb(-opts.currency_decimals)
        amount = (abs(qty) * price).quantize(unit, rounding=ROUND_HALF_EVEN)
    except (ArithmeticError, ValueError, TypeError) as exc:  # InvalidOperation, Overflow
        return Loaded(n, reason="invalid_field", detail=f"Quantity/UnitPrice: {exc!r}")
    cancel = invoice.upper().startswith("C")
    if qty != qty.to_integral_value():
        return Loaded(n, reason="invalid_quantity", detail=f"fractional Quantity {qty}")
    quantity = int(qty)
    if price < 0:
        return Loaded(n, reason="invalid_amount", detail=f"negative UnitPrice {price}")
    if not cancel and quantity <= 0:
        return Loaded(n, reason="invalid_quantity", detail=f"sale with Quantity {quantity}")
    return Loaded(n, event={
        "event_id": _hash_id("retail", row, RETAIL_COLUMNS), "customer_id": customer,
        "order_id": invoice, "type": "refund" if cancel else "purchase", "amount": str(amount),
        "currency": opts.currency, "occurred_at": when.isoformat(), "quantity": abs(quantity),
        "attributes": {"stock_code": str(row.get("StockCode") or ""),
                       "country": str(row.get("Country") or "")}})


def event_row(n: int, row: Mapping[str, Any], opts: LoadOptions) -> Loaded:
    """A row already in the event layout, or mapped to it (``opts.mapping``); the worker
    validates it fully. An ``event_id`` left out is the hash of the row. A row with a
    ``schema_version`` other than 1 is rejected (``unsupported_schema_version``)."""
    mapping = opts.mapping or {}
    version_column = mapping.get("schema_version", "schema_version")
    if version_column in row:  # 1 (or "1": CSV has no numbers), as the worker reads it
        version = row[version_column]
        if not ((type(version) is int and version == IN_SCHEMA_VERSION)
                or version == str(IN_SCHEMA_VERSION)):
            return Loaded(n, reason="unsupported_schema_version",
                          detail=f"schema_version {version!r}: this release reads "
                          f"{IN_SCHEMA_VERSION}")
    event = {f: row.get(mapping.get(f, f)) for f in EVENT_FIELDS}
    event = {k: v for k, v in event.items() if v not in (None, "")}
    event.setdefault("currency", opts.currency)
    event.setdefault("type", "purchase")
    if "event_id" not in event:
        event["event_id"] = _hash_id("row", row, sorted(row))
    missing = [f for f in EVENT_FIELDS if f not in event]
    if missing:
        return Loaded(n, reason="missing_field", detail=f"no {', '.join(missing)}")
    odd = [k for k, v in event.items() if isinstance(v, dict | list | bool)]
    if odd:
        return Loaded(n, reason="invalid_field", detail=f"not a scalar: {', '.join(odd)}")
    event = {k: str(v) for k, v in event.items()}
    try:
        event["occurred_at"] = _parse_time(event["occurred_at"],
                                           ZoneInfo(opts.timezone)).isoformat()
    except (ValueError, OverflowError) as exc:
        return Loaded(n, reason="invalid_timestamp", detail=str(exc))
    return Loaded(n, event=event)


def load_file(path: Path, opts: LoadOptions) -> Iterator[Loaded]:
    """Every row of a file, in file order, as an event or a rejection; exact duplicate events
    (same id) after the first are rejected as ``duplicate_row``."""
    if opts.format == "cdnow":
        for n, r in enumerate(cdnow.read_rows(path), 1):
            yield Loaded(n, event=r.event())
        return
    convert = retail_row if opts.format == "online-retail" else event_row
    seen: set[str] = set()
    for n, row in enumerate(read_records(path), 1):
        if "__error__" in row:  # unreadable where it stands: the row alone is rejected
            reason = row["__error__"] if row["__error__"] in ("not_utf8", "invalid_field") \
                else "not_json"
            yield Loaded(n, reason=reason, detail=str(row.get("__detail__", row["__error__"])))
            continue
        loaded = convert(n, row, opts)
        if loaded.event is not None:
            if loaded.event["event_id"] in seen:
                loaded = Loaded(n, reason="duplicate_row", detail="an identical row came before")
            else:
                seen.add(loaded.event["event_id"])
        yield loaded
