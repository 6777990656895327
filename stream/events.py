"""Event schemas: what comes in, what goes out, and what is dead-lettered.

Events are named in the past tense. Every field carries a description that ends up in the JSON
Schemas published under ``docs/schemas/`` (``python -m stream.events docs/schemas``).
"""

from __future__ import annotations

import base64
import json
import re
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

IN_SCHEMA_VERSION = 1
OUT_SCHEMA_VERSION = 1

AttributeValue = str | int | float | bool | None
_PLAIN_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?", re.ASCII)
_ISO_DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}", re.ASCII)


class PurchaseRecorded(BaseModel):
    """A purchase or a refund, as producers publish it on the ``purchases`` topic.

    The record key must equal ``customer_id``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: str = Field(min_length=1, max_length=200,
                          description="Unique id of this event: the producer's de-duplication key")
    customer_id: str = Field(min_length=1, max_length=128, pattern=r"\S",
                             description="The customer; equals the Kafka record key")
    order_id: str = Field(min_length=1, max_length=200,
                          description="The order; several line events of one order count once "
                          "in frequency")
    type: Literal["purchase", "refund"] = Field(
        description="purchase, or refund (the amount given back)")
    amount: Decimal = Field(ge=0, allow_inf_nan=False, max_digits=18,
                            description="Amount >= 0 in currency units (e.g. 12.34); at most the "
                            "currency's minor-unit digits")
    currency: str = Field(min_length=3, max_length=3, description="ISO 4217 code, e.g. USD")
    occurred_at: AwareDatetime = Field(
        description="Event time, ISO-8601 with a UTC offset (e.g. 1997-01-01T00:00:00Z)")
    quantity: int | None = Field(None, ge=0, description="Units bought (informational)")
    attributes: dict[str, AttributeValue] = Field(
        default_factory=dict, description="Free attributes, e.g. country or channel")
    schema_version: int = Field(IN_SCHEMA_VERSION, ge=1, le=IN_SCHEMA_VERSION, strict=True,
                                description="Version of this schema; a later version is "
                                "dead-lettered (unsupported_schema_version) until the worker "
                                "is upgraded")

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _occurred_at_is_text(cls, v: object) -> object:
        if not isinstance(v, str) or not _ISO_DATETIME.match(v):
            raise ValueError("must be an ISO-8601 date-time string with a UTC offset")
        return v

    @field_validator("amount", mode="before")
    @classmethod
    def _amount_is_plain_decimal(cls, v: object) -> object:
        if isinstance(v, bool) or (isinstance(v, str) and not _PLAIN_DECIMAL.fullmatch(v)):
            raise ValueError("must be a plain decimal number like 12.34")
        return v


class Assignment(BaseModel):
    """A customer's named RFM segment and cluster id at one moment."""

    model_config = ConfigDict(frozen=True)

    segment: str = Field(description="Named RFM segment, e.g. Champions")
    cluster: int | None = Field(description="Cluster id of the online model; null before the "
                                "model has seen enough customers")


class SegmentChanged(BaseModel):
    """A customer's named segment (or, when its own features changed, cluster) changed.

    Published on ``segment-changes`` keyed by ``customer_id``. ``change_id`` is stable: the
    same input gives the same id, so consumers de-duplicate by it.
    """

    model_config = ConfigDict(frozen=True)

    change_id: str = Field(description="Stable id of this change (hex); de-duplication key")
    customer_id: str = Field(description="The customer")
    previous: Assignment | None = Field(description="Segment and cluster before; null on the "
                                        "customer's first assignment")
    current: Assignment = Field(description="Segment and cluster now")
    recency_days: int = Field(description="Whole days from the last purchase to the as-of time")
    frequency: int = Field(description="Distinct purchase orders")
    monetary: Decimal = Field(description="Purchases minus refunds, currency units, >= 0")
    currency: str = Field(description="Reporting currency of monetary")
    r_score: int = Field(ge=1, le=5, description="Recency score, 5 = most recent")
    f_score: int = Field(ge=1, le=5, description="Frequency score, 5 = most frequent")
    m_score: int = Field(ge=1, le=5, description="Monetary score, 5 = highest spend")
    strategy: str = Field(description="Recommended strategy of the current segment")
    cause: Literal["purchase", "refund", "inactivity", "rescore"] = Field(
        description="What caused the change")
    cause_event_id: str | None = Field(description="event_id of the causing event, if any")
    occurred_at: datetime = Field(description="Event time that caused the change (UTC)")
    as_of: datetime = Field(description="As-of time of recency and scores (event-time "
                            "watermark, UTC)")
    emitted_at: datetime = Field(description="Wall-clock time of emission (UTC)")
    schema_version: int = Field(OUT_SCHEMA_VERSION, description="Version of this schema")
    rules_version: str = Field(description="Version of the segment rule table")
    thresholds_version: str = Field(description="What scored: q<N>@<anchor time> (quintiles "
                                    "of N customers at that as-of time, ISO 8601 UTC, e.g. "
                                    "q2400@1997-03-12T00:00:00Z) or fixed")
    model_version: int | None = Field(description="Version of the clustering model snapshot "
                                      "that gave the cluster id; null when none was given")
    replay: bool = Field(False, description="True when emitted by a replay (rfm-stream "
                         "replay), not by live processing")


class DeadLetter(BaseModel):
    """An input record that could not be applied, with the reason. Nothing is dropped silently."""

    model_config = ConfigDict(frozen=True)

    reason: str = Field(description="Named reason, e.g. not_json, missing_field, invalid_amount")
    detail: str = Field(description="Human-readable explanation naming the field")
    source_topic: str = Field(description="Topic the record came from")
    source_partition: int = Field(description="Its partition")
    source_offset: int = Field(description="Its offset")
    key: str | None = Field(description="The record key (base64 when key_encoding is base64)")
    key_encoding: Literal["utf-8", "base64"] = Field("utf-8", description="Encoding of key")
    value: str | None = Field(description="The raw record value (base64 when value_encoding "
                              "is base64)")
    value_encoding: Literal["utf-8", "base64"] = Field(description="Encoding of value")
    value_truncated: bool = Field(False, description="True when value holds only the head of an "
                                  "oversized record (detail gives its size and SHA-256)")
    dead_lettered_at: datetime = Field(description="Wall-clock time (UTC)")
    schema_version: int = Field(OUT_SCHEMA_VERSION, description="Version of this schema")


def encode_raw(raw: bytes | None) -> tuple[str | None, Literal["utf-8", "base64"]]:
    """Raw bytes as text: UTF-8 when they decode, else base64.

    >>> encode_raw(b"ok"), encode_raw(b"\\xff")
    (('ok', 'utf-8'), ('/w==', 'base64'))
    """
    if raw is None:
        return None, "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


SCHEMAS = {"purchase-recorded": PurchaseRecorded, "segment-changed": SegmentChanged,
           "dead-letter": DeadLetter}


def write_schemas(directory: Path) -> list[Path]:
    """Write the JSON Schema of each event to ``directory/<name>.schema.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover
    for p in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(p)
