"""The CDNOW purchase file -> purchase events.

Format (see ``stream/data/NOTICE.md``): whitespace separated, a header line, then
``customer_id date number_of_cds dollar_value`` per row; ``date`` is YYYYMMDD with no time of
day or zone (read as UTC midnight); ``dollar_value`` is USD with 2 decimals.

Every row is one order (same-day rows are separate orders). There is no order id, so one is
derived deterministically: ``<customer>:<date>:<n>`` with ``n`` the row's index among that
customer's rows of that day (0, 1, ...). The ``event_id`` is ``cdnow:<order_id>``, so loading
the file twice produces the same ids.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import IO

N_ROWS = 69_659
N_CUSTOMERS = 23_570


@dataclass(frozen=True, slots=True)
class CdnowRow:
    """One CDNOW row with its derived ids."""

    customer_id: str
    day: str  # YYYYMMDD
    quantity: int
    amount: Decimal  # USD
    order_id: str

    @property
    def occurred_at(self) -> datetime:
        return _midnight(self.day)

    @property
    def event_id(self) -> str:
        return f"cdnow:{self.order_id}"

    def event(self) -> dict[str, object]:
        """The row as a ``PurchaseRecorded`` JSON object (amount as a decimal string)."""
        return {"event_id": self.event_id, "customer_id": self.customer_id,
                "order_id": self.order_id, "type": "purchase", "amount": str(self.amount),
                "currency": "USD", "occurred_at": self.occurred_at.isoformat(),
                "quantity": self.quantity, "attributes": {"source": "cdnow"}}


def _midnight(day: str) -> datetime:
    """Midnight UTC of a CDNOW date ``YYYYMMDD`` (without strptime: ~10 µs a call, and it
    reads 1997111 too).

    Raises
    ------
    ValueError
        When ``day`` is not 8 digits of a real day."""
    if len(day) != 8 or not day.isdigit():
        raise ValueError(f"date {day!r} is not YYYYMMDD")
    return datetime(int(day[:4]), int(day[4:6]), int(day[6:]), tzinfo=UTC)


def open_default() -> IO[bytes]:
    """The CDNOW file shipped with the package (gzip)."""
    return resources.files("stream").joinpath("data", "CDNOW_master.txt.gz").open("rb")


def read_rows(path: str | Path | None = None) -> Iterator[CdnowRow]:
    """Rows of a CDNOW file (plain or ``.gz``); None reads the shipped copy.

    Raises
    ------
    ValueError
        On a malformed line (names the line number), or a gzip file cut short or corrupt.
    """
    with open_default() if path is None else open(path, "rb") as raw:  # noqa: SIM115
        data = raw.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{path or 'the CDNOW file'} is not a whole gzip file: {exc}") \
                from exc
    seen: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(data.decode("ascii").splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0] == "customer_id":
            continue
        try:
            cust, day, qty, value = parts
            amount, quantity = Decimal(value), int(qty)
            _midnight(day)
        except (ValueError, InvalidOperation) as exc:
            raise ValueError(f"CDNOW line {lineno} is malformed: {line!r}") from exc
        n = seen.get((cust, day), 0)
        seen[(cust, day)] = n + 1
        yield CdnowRow(cust, day, quantity, amount, f"{cust}:{day}:{n}")

