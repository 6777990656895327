"""Segment-change detection and stable change ids. Pure.

A segment change is a change of the named RFM segment, including the first assignment
(previous = None). A score-only change emits nothing. A cluster-only change emits only when the
customer's own features changed (not because centroids drifted while the customer did nothing).
"""

from __future__ import annotations

import hashlib

from stream.events import Assignment


def is_change(previous: Assignment | None, current: Assignment, features_changed: bool) -> bool:
    """Whether moving from ``previous`` to ``current`` is a segment change to publish.

    Examples
    --------
    >>> a = Assignment(segment="Champions", cluster=1)
    >>> is_change(None, a, False)
    True
    >>> is_change(a, Assignment(segment="At Risk", cluster=1), False)
    True
    >>> is_change(a, Assignment(segment="Champions", cluster=2), False)
    False
    >>> is_change(a, Assignment(segment="Champions", cluster=2), True)
    True
    >>> is_change(a, a, True)
    False
    """
    if previous is None:
        return True
    return changes(previous.segment, previous.cluster, current.segment, current.cluster,
                   features_changed)


def changes(segment: str | None, cluster: int | None, new_segment: str,
            new_cluster: int | None, features_changed: bool) -> bool:
    """:func:`is_change` on plain values (the published segment and cluster, None when none
    was published, and the new ones): the planner's hot path.

    >>> changes(None, None, "A", None, False), changes("A", 1, "A", 2, False)
    (True, False)
    """
    if segment is None or segment != new_segment:
        return True
    return cluster != new_cluster and features_changed


def change_id(customer_id: str, cause_ref: str, previous: Assignment | None,
              current: Assignment) -> str:
    """Stable id of a change: the same customer, cause and transition give the same id.

    ``cause_ref`` names what caused it (the causing ``event_id``). 32 hex characters of a
    SHA-256.

    >>> a, b = Assignment(segment="A", cluster=None), Assignment(segment="B", cluster=3)
    >>> change_id("c1", "e9", a, b) == change_id("c1", "e9", a, b) != change_id("c1", "e9", None, b)
    True
    """
    def part(x: Assignment | None) -> str:
        return "-" if x is None else f"{x.segment}\x1f{'' if x.cluster is None else x.cluster}"

    text = "\x1e".join((customer_id, cause_ref, part(previous), part(current)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
