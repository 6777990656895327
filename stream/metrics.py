"""Prometheus metrics of the worker, in one typed bundle built from a replaceable registry.

Names follow Prometheus conventions (``_total`` counters, base units in the name: seconds).
Label values come from closed sets only (dead-letter reasons, segment names of the rule table,
change causes, cluster ids, partitions of the input topic), never a customer id, and every
label value is created at start-up (:meth:`Metrics.create`): the number of series is fixed by
the configuration, not by the data (a test checks it after 10 and 10,000 customers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from state.codec import CAUSES

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
_LAG_BUCKETS = (0.01, 0.1, 1, 10, 60, 600, 3600, 86400, 7 * 86400, 30 * 86400, 365 * 86400)
REDIS_CALLS = ("read", "commit", "population", "train")


@dataclass(frozen=True)
class Metrics:
    """The worker's metrics (names are ``<prefix>_...``). README "Metrics" is the catalogue."""

    registry: CollectorRegistry
    events_consumed: Counter
    events_applied: Counter
    duplicates_skipped: Counter
    dead_lettered: Counter
    segment_entries: Counter
    segment_exits: Counter
    batch_seconds: Histogram
    event_time_lag: Histogram
    redis_seconds: Histogram
    customers: Gauge
    cluster_customers: Gauge
    applied_offset: Gauge
    consumer_lag: Gauge
    held_back: Gauge
    outbox_depth: Gauge
    relay_restarts: Counter
    as_of_seconds: Gauge
    model_version: Gauge
    model_age: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None, prefix: str = "rfm",
               segments: Iterable[str] = (), reasons: Iterable[str] = (),
               partitions: int = 0, clusters: int = 0) -> Metrics:
        """Build the bundle in ``registry`` (a fresh one when None, e.g. in tests), with a
        series for every segment, dead-letter reason, change cause, partition and cluster."""
        reg = registry if registry is not None else CollectorRegistry()
        p = prefix
        m = cls(
            registry=reg,
            events_consumed=Counter(f"{p}_events_consumed", "Records read from the input topic",
                                    registry=reg),
            events_applied=Counter(f"{p}_events_applied", "Events applied to RFM state",
                                   registry=reg),
            duplicates_skipped=Counter(f"{p}_duplicates_skipped",
                                       "Records skipped as already applied (by offset or "
                                       "event_id)", ["kind"], registry=reg),
            dead_lettered=Counter(f"{p}_dead_lettered", "Records sent to the dead-letter topic",
                                  ["reason"], registry=reg),
            segment_entries=Counter(f"{p}_segment_entries", "Segment changes published, by the "
                                    "segment entered and the cause", ["segment", "cause"],
                                    registry=reg),
            segment_exits=Counter(f"{p}_segment_exits", "Segment changes published, by the "
                                  "segment left and the cause", ["segment", "cause"],
                                  registry=reg),
            batch_seconds=Histogram(f"{p}_processing_latency_seconds",
                                    "Time to process one partition batch: validate, apply, "
                                    "score, segment, cluster, compare-and-set",
                                    buckets=_LATENCY_BUCKETS, registry=reg),
            event_time_lag=Histogram(f"{p}_event_time_lag_seconds", "Wall clock minus event "
                                     "time of each applied event (large in a replay)",
                                     buckets=_LAG_BUCKETS, registry=reg),
            redis_seconds=Histogram(f"{p}_redis_call_seconds", "Latency of Redis calls",
                                    ["call"], buckets=_LATENCY_BUCKETS, registry=reg),
            customers=Gauge(f"{p}_customers", "Customers per published segment", ["segment"],
                            registry=reg),
            cluster_customers=Gauge(f"{p}_cluster_customers", "Estimated customers per cluster "
                                    "(latest model snapshot)", ["cluster"], registry=reg),
            applied_offset=Gauge(f"{p}_applied_offset", "Last applied offset per partition "
                                 "(-1: none applied yet)", ["partition"], registry=reg),
            consumer_lag=Gauge(f"{p}_consumer_lag", "Records behind the end of each owned "
                               "partition (high watermark - position; 0 when not owned)",
                               ["partition"], registry=reg),
            held_back=Gauge(f"{p}_held_back", "Records of each owned partition held back "
                            "until the worker's other partitions catch up in event time "
                            "(RFM_LIVE_MAX_SKEW_S)", ["partition"], registry=reg),
            outbox_depth=Gauge(f"{p}_outbox_depth", "Segment changes and dead letters waiting "
                               "in the outbox", registry=reg),
            relay_restarts=Counter(f"{p}_relay_restarts", "Outbox relays (the worker's "
                                   "publishing process) started again after one died or was "
                                   "killed", registry=reg),
            as_of_seconds=Gauge(f"{p}_as_of_seconds", "As-of event time each partition "
                                "scores at (Unix seconds)", ["partition"], registry=reg),
            model_version=Gauge(f"{p}_model_version", "Version of the clustering model "
                                "snapshot in use", registry=reg),
            model_age=Gauge(f"{p}_model_age_seconds", "Event time since the snapshot in use "
                            "was trained (as-of time minus the snapshot's)", registry=reg),
        )
        for kind in ("offset", "event_id"):
            m.duplicates_skipped.labels(kind)
        for reason in reasons:
            m.dead_lettered.labels(reason)
        for seg in segments:
            m.customers.labels(seg)
            for cause in CAUSES:
                m.segment_entries.labels(seg, cause)
                m.segment_exits.labels(seg, cause)
        for call in REDIS_CALLS:
            m.redis_seconds.labels(call)
        for part in range(partitions):  # lag: once it is known
            m.applied_offset.labels(str(part)).set(-1)  # Kafka's "no offset"; 0 is an offset
            m.as_of_seconds.labels(str(part))
        for c in range(clusters):
            m.cluster_customers.labels(str(c))
        return m
