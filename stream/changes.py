"""Segment-change detection and stable change ids. Pure.

A segment change is a change of the named RFM segment, including the first assignment
(previous = None). A score-only change emits nothing. A cluster-only change emits only when the
customer's own features changed (not because centroids drifted while the customer did nothing).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

from stream.events import OUT_SCHEMA_VERSION, Assignment, SegmentChanged


class Assigned(NamedTuple):
    """A segment and cluster id (the fields of :class:`stream.events.Assignment`)."""

    segment: str
    cluster: int | None


class Change(NamedTuple):
    """A segment change as the planner makes it: the fields of
    :class:`stream.events.SegmentChanged` (its schema and documentation), built and
    serialised without pydantic on the hot path. :meth:`to_json` gives the bytes pydantic
    would (a unit test checks it); :meth:`model` the pydantic event."""

    change_id: str
    customer_id: str
    previous: Assigned | None
    current: Assigned
    recency_days: int
    frequency: int
    monetary: Decimal
    currency: str
    r_score: int
    f_score: int
    m_score: int
    strategy: str
    cause: str
    cause_event_id: str | None
    occurred_at: datetime
    as_of: datetime
    emitted_at: datetime
    rules_version: str
    thresholds_version: str
    model_version: int | None
    replay: bool = False
    schema_version: int = OUT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the change, in the schema's field order (datetimes as such; a
        unit test checks it against pydantic's output, so a schema change cannot drift)."""
        prev, cur = self.previous, self.current
        return {
            "change_id": self.change_id, "customer_id": self.customer_id,
            "previous": None if prev is None else {"segment": prev.segment,
                                                   "cluster": prev.cluster},
            "current": {"segment": cur.segment, "cluster": cur.cluster},
            "recency_days": self.recency_days, "frequency": self.frequency,
            "monetary": str(self.monetary), "currency": self.currency,
            "r_score": self.r_score, "f_score": self.f_score, "m_score": self.m_score,
            "strategy": self.strategy, "cause": self.cause,
            "cause_event_id": self.cause_event_id, "occurred_at": self.occurred_at,
            "as_of": self.as_of, "emitted_at": self.emitted_at,
            "schema_version": self.schema_version, "rules_version": self.rules_version,
            "thresholds_version": self.thresholds_version,
            "model_version": self.model_version, "replay": self.replay}

    def to_json(self) -> str:
        """The published JSON of the change (what ``SegmentChanged.model_dump_json`` gives)."""
        return orjson.dumps(self.to_dict(), option=orjson.OPT_UTC_Z).decode("utf-8")

    def model(self) -> SegmentChanged:
        """The change as the validated pydantic event."""
        return SegmentChanged.model_validate_json(self.to_json())




def changes(segment: str | None, cluster: int | None, new_segment: str,
            new_cluster: int | None, features_changed: bool) -> bool:
    """Whether moving from the published ``segment``/``cluster`` (None: nothing published
    yet) to the new ones is a segment change to publish.

    >>> changes(None, None, "Champions", 1, False)  # first assignment
    True
    >>> changes("Champions", 1, "At Risk", 1, False)
    True
    >>> changes("Champions", 1, "Champions", 2, False)  # centroids drifted, customer idle
    False
    >>> changes("Champions", 1, "Champions", 2, True)   # the customer's own event
    True
    >>> changes("Champions", 1, "Champions", 1, True)
    False
    """
    if segment is None or segment != new_segment:
        return True
    return cluster != new_cluster and features_changed


def change_id(customer_id: str, cause_ref: str, previous: Assignment | Assigned | None,
              current: Assignment | Assigned) -> str:
    """Stable id of a change: the same customer, cause and transition give the same id.

    ``cause_ref`` names what caused it (the causing ``event_id``). 32 hex characters of a
    SHA-256.

    >>> a, b = Assignment(segment="A", cluster=None), Assignment(segment="B", cluster=3)
    >>> change_id("c1", "e9", a, b) == change_id("c1", "e9", a, b) != change_id("c1", "e9", None, b)
    True
    """
    def part(x: Assignment | Assigned | None) -> str:
        return "-" if x is None else f"{x.segment}\x1f{'' if x.cluster is None else x.cluster}"

    text = "\x1e".join((customer_id, cause_ref, part(previous), part(current)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
