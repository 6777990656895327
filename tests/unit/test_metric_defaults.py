"""The worker's Prometheus metrics as a fresh worker exports them (no I/O)."""

from __future__ import annotations

from stream.metrics import Metrics
from stream.segments import SegmentTable
from stream.validation import REASONS


def test_applied_offset_reads_minus_one_until_an_offset_is_known():
    """A second fresh user read 0.0 for partitions that had applied nothing: the same as a
    partition whose first record (offset 0) was applied. -1 is Kafka's "no offset"."""
    m = Metrics.create(segments=SegmentTable.load().segments, reasons=REASONS, partitions=3,
                       clusters=1)

    def shown(p: int) -> float | None:
        return m.registry.get_sample_value("rfm_applied_offset", {"partition": str(p)})

    assert [shown(p) for p in range(3)] == [-1.0, -1.0, -1.0]
