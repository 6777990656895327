"""Records go to the partition Kafka's default partitioner gives their key (murmur2, as the
Java client), also through :class:`stream.kafka_io.BatchSender`'s cache of key partitions."""

from __future__ import annotations

import pytest

from stream.kafka_io import BatchSender, key_partition

# Kafka's own test vectors for murmur2 (clients/src/test/java/org/apache/kafka/common/utils/
# UtilsTest.java, testMurmur2): key -> 32-bit signed hash
KAFKA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("partitions", [1, 4, 7, 12])
def test_key_partition_is_kafkas_default_partitioner(partitions):
    for key, h in KAFKA_MURMUR2.items():
        assert key_partition(key, partitions) == (h & 0x7FFFFFFF) % partitions


def test_the_cached_partitions_stay_right_across_counts_and_cache_clears():
    sender = BatchSender(producer=None)  # type: ignore[arg-type]
    sender.CACHED_KEYS = 3  # cleared every few keys
    keys = list(KAFKA_MURMUR2) * 3
    for partitions in (4, 7, 4):
        got = [sender.partition_of(k, partitions) for k in keys]
        assert got == [(KAFKA_MURMUR2[k] & 0x7FFFFFFF) % partitions for k in keys]
    assert all(len(c) <= 3 for c in sender._key_partitions.values())
