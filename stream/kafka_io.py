"""Small Kafka helpers over aiokafka: create topics, produce batched, read a topic to its end.

The local broker's ``end_offsets()`` is wrong when the newest batch holds several records
(docs/local-broker.md), so "the end" is read from fetch responses (``consumer.highwater``) and the
producer's own acknowledgements, never from ListOffsets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from stream.settings import Settings

Kafka = str | Mapping[str, Any]
"""Where a client connects: a bootstrap string (``host:port,...``, PLAINTEXT, as the tests and
benchmarks on loopback use), or the aiokafka client arguments of :func:`client_options`."""


def bootstrap_of(kafka_url: str) -> str:
    """``kafka://h1:9092;h2:9092`` -> ``h1:9092,h2:9092``."""
    return ",".join(u.split("://", 1)[-1] for u in kafka_url.replace(";", ",").split(","))


def client_options(settings: Settings) -> dict[str, Any]:
    """aiokafka client arguments for the settings' Kafka: bootstrap servers and the security
    the worker's faust app uses (``RFM_KAFKA_SECURITY_PROTOCOL``, SASL mechanism and
    credentials, CA file), for the clients outside faust (``load``, ``replay``, the demo, the
    worker's re-read of offsets Redis is missing).

    >>> client_options(Settings(kafka_url="kafka://a:9092;b:9092"))
    {'bootstrap_servers': 'a:9092,b:9092', 'security_protocol': 'PLAINTEXT'}
    """
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"bootstrap_servers": bootstrap_of(settings.kafka_url),
                               "security_protocol": protocol}
    if protocol.endswith("SSL"):
        options["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=password.get_secret_value() if password else None)
    return options


def ssl_context(settings: Settings) -> Any:
    """The TLS context of SSL and SASL_SSL connections: the system's CAs, or
    ``RFM_KAFKA_SSL_CAFILE``."""
    import ssl

    return ssl.create_default_context(cafile=settings.kafka_ssl_cafile)


def _client(kafka: Kafka) -> dict[str, Any]:
    return {"bootstrap_servers": kafka} if isinstance(kafka, str) else dict(kafka)


async def started(client: Any) -> Any:
    """``client.start()`` (an aiokafka consumer, producer or admin client), closed again when
    it fails (a connection or security error), so that no "Unclosed ..." warning follows the
    error; returns the client."""
    try:
        await client.start()
    except BaseException:
        await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
        raise
    return client


async def create_topics(kafka: Kafka, topics: dict[str, int],
                        compacted: Iterable[str] = ()) -> None:
    """Create topics ``{name: partitions}`` (replication 1; ``compacted`` ones with
    ``cleanup.policy=compact``); existing ones are left as they are."""
    compact = set(compacted)
    admin = await started(AIOKafkaAdminClient(**_client(kafka)))
    try:
        for name, partitions in topics.items():
            with contextlib.suppress(TopicAlreadyExistsError):
                configs = {"cleanup.policy": "compact"} if name in compact else {}
                await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class Message:
    """One record to produce: key, value, and a timestamp (epoch ms, e.g. the event time)."""

    key: bytes | None
    value: bytes
    timestamp_ms: int | None = None


def compact(data: bytes) -> bytes:
    """A copy of ``data`` of exactly its size, for records held until they are produced:
    each ``orjson.dumps`` result keeps a buffer of ~4 KiB whatever its length (orjson issue
    #483), which made a million loaded rows take ~4.5 GB."""
    return bytes(memoryview(data))


def key_partition(key: bytes, partitions: int) -> int:
    """Partition of a record key under the default partitioner (murmur2, as the Java client
    and aiokafka; librdkafka's default ``consistent_random`` differs)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class BatchSender:
    """Produces many records to one topic with aiokafka's batch API: records go to the
    partition the default partitioner would choose for their key (murmur2, as the Java client
    and aiokafka; keyless records to partition 0), in order, one future per record batch
    instead of one per record.

    Parameters
    ----------
    producer
        A started ``AIOKafkaProducer`` (its acks, linger and credentials apply).
    """

    CACHED_KEYS = 65_536  # per partition count; the cache is emptied when it is full

    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer
        self._partitions: dict[str, int] = {}
        # partition count -> {key: partition}: aiokafka's murmur2 is Python (~1 µs a short key,
        # ~2% of the aligned worker's time), and a customer's key recurs in each change of it
        # and on both topics a change goes to
        self._key_partitions: dict[int, dict[bytes, int]] = {}

    def partition_of(self, key: bytes, partitions: int) -> int:
        """:func:`key_partition`, remembered for the last :attr:`CACHED_KEYS` keys."""
        cache = self._key_partitions.setdefault(partitions, {})
        p = cache.get(key)
        if p is None:
            if len(cache) >= self.CACHED_KEYS:
                cache.clear()
            p = cache[key] = key_partition(key, partitions)
        return p

    async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
                   ) -> Awaitable[Any]:
        """Queue ``(key, value)`` records; returns an awaitable that completes when the
        broker acknowledged all of them (and raises the first error)."""
        n = self._partitions.get(topic)
        if n is None:
            n = self._partitions[topic] = len(await self.producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
        if n == 1 and records:  # one partition: no key to hash (aiokafka's murmur2 is Python)
            by_partition[0] = list(records)
        else:
            for key, value in records:
                p = 0 if key is None else self.partition_of(key, n)
                by_partition.setdefault(p, []).append((key, value))
        futures = []
        for p, recs in by_partition.items():
            batch = self.producer.create_batch()
            for key, value in recs:
                if batch.append(key=key, value=value, timestamp=None) is None:  # full
                    batch.close()
                    futures.append(await self.producer.send_batch(batch, topic, partition=p))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            batch.close()
            futures.append(await self.producer.send_batch(batch, topic, partition=p))
        return asyncio.gather(*futures)


async def produce(kafka: Kafka, topic: str, messages: Iterable[Message],
                  progress: Callable[[int], None] | None = None, window: int = 5000,
                  compression: str | None = None) -> dict[int, int]:
    """Produce messages (batched, acks=all, ``compression``: none, ``gzip``, ``snappy``,
    ``lz4`` or ``zstd``) and wait for every acknowledgement.

    Returns
    -------
    dict
        ``{partition: highest acknowledged offset}``.
    """
    producer = AIOKafkaProducer(**_client(kafka), linger_ms=10, acks="all",
                                max_batch_size=256 * 1024, compression_type=compression)
    await started(producer)
    last: dict[int, int] = {}
    try:
        futures = []

        async def drain() -> None:
            for meta in await asyncio.gather(*futures):
                last[meta.partition] = max(last.get(meta.partition, -1), meta.offset)
            if progress:
                progress(len(futures))
            futures.clear()

        for m in messages:
            futures.append(await producer.send(topic, m.value, key=m.key,
                                               timestamp_ms=m.timestamp_ms))
            if len(futures) >= window:
                await drain()
        await drain()
    finally:
        await producer.stop()
    return last


async def read_all(kafka: Kafka, topic: str, idle_s: float = 2.0, timeout_s: float = 60.0
                   ) -> list[tuple[int, int, bytes | None, bytes]]:
    """Read every record of a topic from the beginning to its current end.

    Returns ``(partition, offset, key, value)`` in partition, then offset order. The end is
    reached when every partition's position has met its high watermark (from fetch responses)
    and nothing new arrived for ``idle_s`` seconds.
    """
    consumer = AIOKafkaConsumer(**_client(kafka), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await started(consumer)
    out: list[tuple[int, int, bytes | None, bytes]] = []
    try:
        tps = await from_beginning(consumer, topic)
        if not tps:
            return out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        quiet_since = loop.time()
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                out.extend((r.partition, r.offset, r.key, r.value) for r in recs)
            if batch:
                quiet_since = loop.time()
            if await at_end(consumer, tps) and loop.time() - quiet_since >= idle_s:
                break
    finally:
        await consumer.stop()
    out.sort(key=lambda r: (r[0], r[1]))
    return out


async def from_beginning(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to a started consumer (no group) and seek them to
    the beginning; returns them in partition order ([]: no such topic)."""
    parts = consumer.partitions_for_topic(topic)
    if parts is None:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    if tps:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
    return tps


async def at_end(consumer: AIOKafkaConsumer, tps: Iterable[TopicPartition]) -> bool:
    """Whether the consumer's position in each of ``tps`` has reached its high watermark,
    as the fetch responses gave it (False before one came; the local broker's
    ``end_offsets()`` is wrong: module docstring)."""
    for tp in tps:
        hw = consumer.highwater(tp)
        if hw is None or await consumer.position(tp) < hw:
            return False
    return True


async def read_range(kafka: Kafka, topic: str, partition: int, start: int, end: int,
                     timeout_s: float = 30.0) -> list[tuple[int, bytes | None, bytes | None]]:
    """Records ``(offset, key, value)`` of one partition with ``start <= offset < end``.

    Used to re-read what Redis is missing (its last applied offset is behind what the consumer
    group delivers, e.g. after Redis lost its last second of writes). Offsets that hold no
    record (deleted, transaction markers) are simply absent. Starts at the log start when
    ``start`` is no longer in the log.

    Raises
    ------
    TimeoutError
        When the range could not be read to its end within ``timeout_s`` (never a partial
        answer: the caller would take missing records for holes).
    """
    consumer = AIOKafkaConsumer(**_client(kafka), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await started(consumer)
    out: list[tuple[int, bytes | None, bytes | None]] = []
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if loop.time() > deadline:
                raise TimeoutError(f"could not read {topic}[{partition}] offsets {start}..{end} "
                                   f"within {timeout_s} s")
            batch = await consumer.getmany(tp, timeout_ms=200)
            for r in batch.get(tp, []):
                if start <= r.offset < end:
                    out.append((r.offset, r.key, r.value))
            position = await consumer.position(tp)
            hw = consumer.highwater(tp)
            if position >= end or (hw is not None and position >= hw):
                break
    finally:
        await consumer.stop()
    return out
