"""Prometheus metrics of the worker, in one typed bundle built from a replaceable registry.

Label values come from closed sets only (dead-letter reasons, segment names of the rule table,
change causes, partitions of the input topic); never a customer id.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)


@dataclass(frozen=True)
class Metrics:
    """The worker's metrics (names are ``<prefix>_...``; units in the names)."""

    registry: CollectorRegistry
    events_consumed: Counter
    events_applied: Counter
    duplicates_skipped: Counter
    dead_lettered: Counter
    segment_changes: Counter
    batch_seconds: Histogram
    customers: Gauge
    applied_offset: Gauge
    outbox_depth: Gauge
    as_of_seconds: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None, prefix: str = "rfm") -> Metrics:
        """Build the bundle in ``registry`` (a fresh one when None, e.g. in tests)."""
        reg = registry if registry is not None else CollectorRegistry()
        p = prefix
        return cls(
            registry=reg,
            events_consumed=Counter(f"{p}_events_consumed", "Records read from the input topic",
                                    registry=reg),
            events_applied=Counter(f"{p}_events_applied", "Events applied to RFM state",
                                   registry=reg),
            duplicates_skipped=Counter(f"{p}_duplicates_skipped",
                                       "Records skipped as already applied",
                                       ["kind"], registry=reg),
            dead_lettered=Counter(f"{p}_dead_lettered", "Records sent to the dead-letter topic",
                                  ["reason"], registry=reg),
            segment_changes=Counter(f"{p}_segment_changes", "Segment-change events emitted",
                                    ["from_segment", "to_segment", "cause"], registry=reg),
            batch_seconds=Histogram(f"{p}_processing_latency_seconds",
                                    "Time to process one partition batch: validate, apply, "
                                    "score, segment, cluster, compare-and-set",
                                    buckets=_LATENCY_BUCKETS, registry=reg),
            customers=Gauge(f"{p}_customers", "Customers per stored segment", ["segment"],
                            registry=reg),
            applied_offset=Gauge(f"{p}_applied_offset", "Last applied offset per partition",
                                 ["partition"], registry=reg),
            outbox_depth=Gauge(f"{p}_outbox_depth", "Segment changes waiting in the outbox",
                               registry=reg),
            as_of_seconds=Gauge(f"{p}_as_of_seconds", "As-of event time each partition "
                                "scores at (Unix seconds)", ["partition"], registry=reg),
        )
