"""The worker's per-partition path (``stream.partition_runner.PartitionRunner``) against a real Redis: a
commit conflict that outlasts the processor's own five tries is retried, never taken for a
poison record."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from state.store import ConflictError, RedisStore
from stream.partition_runner import PartitionRunner
from stream.pipeline import RawRecord
from stream.services import build_services

# more rounds than two runs of the processor's five tries: the batch, then the record alone
# (the one-by-one path) both give up, so a conflict taken for a processing failure would end
# as a processing_error dead letter
ROUNDS = 12


def purchase(n: int, customer: str, amount: str) -> RawRecord:
    value = json.dumps({"event_id": f"e{n}", "customer_id": customer, "order_id": f"o{n}",
                       "type": "purchase", "amount": amount, "currency": "USD",
                       "occurred_at": "2024-03-01T00:00:00Z"}).encode()
    return RawRecord("purchases", 0, n, customer.encode(), value)


async def test_another_writer_committing_for_longer_than_five_tries_loses_nothing(settings):
    services = build_services(settings.model_copy(update={"partitions": 1}))
    store = services.store
    other = RedisStore(aioredis.Redis.from_url(settings.redis_url.get_secret_value(),
                                               decode_responses=True), settings.namespace)
    rereads: list[tuple[int, int, int]] = []

    async def reread(partition: int, start: int, end: int) -> list:
        rereads.append((partition, start, end))
        return []

    # the second writer (an old owner during a rebalance) commits to partition 0 between the
    # first writer's read and its commit, ROUNDS times, then stops
    theirs: list[int] = []
    conflicts: list[ConflictError] = []
    real_commit = store.commit

    async def commit_after_the_other_writer(partition, expected_seq, *args, **kwargs):
        if len(theirs) < ROUNDS:
            view = await other.read_partition(partition, [], [0])
            theirs.append(await other.commit(partition, view.seq, {}, [], []))
        try:
            return await real_commit(partition, expected_seq, *args, **kwargs)
        except ConflictError as exc:
            conflicts.append(exc)
            raise

    store.commit = commit_after_the_other_writer
    batch = [purchase(0, "alice", "12.00"), purchase(1, "bob", "600.00"),
             purchase(2, "alice", "3.50")]
    runner = PartitionRunner(services, reread)
    try:
        out = await runner.process(0, batch)
        again = await runner.process(0, batch)  # a redelivery changes nothing
        alice = await store.read_customer(0, "alice")
        bob = await store.read_customer(0, "bob")
        entries = await store.outbox_read(0, 100)
        meta = await store.partition_meta([0])
    finally:
        await store.client.aclose()
        await other.client.aclose()

    assert len(theirs) == ROUNDS and len(conflicts) == ROUNDS  # the scenario happened
    assert rereads == []
    # hand-worked: alice two orders, 12.00 + 3.50; bob one order of 600.00; each once
    assert (alice.state.frequency, alice.state.monetary_minor) == (2, 1550)
    assert (bob.state.frequency, bob.state.monetary_minor) == (1, 60000)
    assert meta[0][0] == 2
    assert out.dead_letters == [] and again.dead_letters == [] and again.changes == []
    assert [e.kind for e in entries if e.kind != "c"] == []  # no dead letter in the outbox
    assert {e.key for e in entries} == {"alice", "bob"}
    assert services.metrics.registry.get_sample_value(
        f"{settings.metrics_prefix}_dead_lettered_total", {"reason": "processing_error"}) == 0


async def test_unreadable_customers_records_are_dead_lettered_and_the_rest_applied_together(
        settings):
    """A breaker's case: a partition where some customers' stored values were unreadable
    caught up five times slower (each failed batch was processed again a record at a time,
    with a traceback per record). Now their records become processing_error dead letters and
    the others are applied in one more step."""
    services = build_services(settings.model_copy(update={"partitions": 1,
                                                          "cache_customers": 0}))
    store, processor = services.store, services.processor

    async def reread(partition: int, start: int, end: int) -> list:
        return []

    runner = PartitionRunner(services, reread)
    steps: list[int] = []
    real_process = processor.process

    async def counted(partition, records, *args, **kwargs):
        steps.append(len(records))
        return await real_process(partition, records, *args, **kwargs)

    try:
        first = [purchase(n, c, "10.00") for n, c in enumerate(["bad1", "bad2", "ok"])]
        await runner.process(0, first)
        k = store.keys(0)
        await store.client.set(k.customer("bad1"), "junk")  # not a value of any format
        await store.client.delete(k.customer("bad2"))
        await store.client.hset(k.customer("bad2"), "f", "3")  # a hash, written by hand
        customers = ["ok", "bad1", "new1", "bad2", "new2", "bad1", "ok", "new1"] * 5
        batch = [purchase(3 + i, c, "1.00") for i, c in enumerate(customers)]
        processor.process = counted
        out = await runner.process(0, batch)
        ok, new1 = await store.read_customer(0, "ok"), await store.read_customer(0, "new1")
        meta = await store.partition_meta([0])
    finally:
        await store.client.aclose()

    assert steps == [40, 40]  # the failed step, then the others together
    dead = {(d.source_offset, d.reason) for d in out.dead_letters}
    assert dead == {(3 + i, "processing_error") for i, c in enumerate(customers)
                    if c.startswith("bad")}
    details = {d.source_offset: d.detail for d in out.dead_letters}
    assert all(f"'{customers[o - 3]}'" in details[o] for o in details)
    # hand-worked: "ok" 10.00 then ten orders of 1.00; "new1" ten orders of 1.00
    assert (ok.state.frequency, ok.state.monetary_minor) == (11, 2000)
    assert (new1.state.frequency, new1.state.monetary_minor) == (10, 1000)
    assert meta[0][0] == 42
