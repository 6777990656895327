"""Replaying CDNOW twice in event time, one partition, gives the identical segment-change
sequence (emitted_at aside), whatever the batch sizes (the first 30,000 events here, to keep
the suite short; the crash tests replay all of it through real workers): purchases, threshold refreshes,
re-scores, inactivity and the clustering model are all driven by event time and offsets."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest

from stream import cdnow
from stream.pipeline import RawRecord
from stream.services import build_services

pytestmark = pytest.mark.timeout(900)
NOW = 1_800_000_000_000


ROWS = 30_000  # the first 5 months: the whole population arrives, most re-scores happen


async def replay(settings, namespace: str, batch: int) -> list[dict]:
    rows = sorted(cdnow.read_rows(), key=lambda r: r.day)[:ROWS]
    records = [RawRecord("purchases", 0, i, r.customer_id.encode(), orjson.dumps(r.event()))
               for i, r in enumerate(rows)]
    services = build_services(settings.model_copy(update={"partitions": 1,
                                                          "namespace": namespace}))
    changes = []
    try:
        for i in range(0, len(records), batch):
            out = await services.processor.process(0, records[i:i + batch], now_ms=NOW)
            changes += [c.model().model_dump(mode="json", exclude={"emitted_at"}) for c in out.changes]
    finally:
        await services.store.client.aclose()
    return changes


async def test_cdnow_replayed_twice_gives_identical_changes(settings):
    first = await replay(settings, settings.namespace + "a", 1000)
    second = await replay(settings, settings.namespace + "b", 137)
    causes = Counter(c["cause"] for c in first)
    assert causes["purchase"] > 10_000 and causes["rescore"] > 1_000, causes
    assert sum(c["current"]["cluster"] is not None for c in first) > 5_000
    assert len(first) == len(second)
    assert first == second
