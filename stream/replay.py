"""Load files into the purchases topic, and replay a topic into a fresh state namespace.

A replay reads every partition of the topic from its beginning to the end it had when the
replay started, with no consumer group (nothing is committed to Kafka; the new namespace's
applied offsets are the replay's progress), and applies the records through the same batch
processor as the worker, in offset order per partition: in event time, so the watermark drives
recency and a replay of one partition gives the same state and changes every time. Across
partitions, records are released in event time (``stream.interleave``, within
``RFM_REPLAY_MAX_SKEW_S``; across processes through Redis), so the partitions move through history
together, as a live worker applies them: the clustering model, trained by partition 0, is
there for the others' customers when it would be live.

``--from`` (an event time) cannot seek: the local broker's ``offsets_for_times`` answers with
write times (docs/local-broker.md), so the replay reads from the beginning and records whose event
time is earlier only advance the applied offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.exceptions import RedisError

from state.keys import alias_key, replay_claim_key, replay_frontier_key
from stream.interleave import EventTimeMerge
from stream.kafka_io import BatchSender, Message, client_options, compact, create_topics, produce, started
from stream.loaders import Loaded
from stream.pipeline import RawRecord
from stream.settings import Settings
from stream.validation import Accepted, Rejected, validate


@dataclass
class LoadSummary:
    """What a load did: events produced, rejected rows by reason."""

    events: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rows: int = 0


async def load(settings: Settings, rows: Iterable[Loaded], topic: str | None = None,
               dry_run: bool = False, on_reject: Callable[[Loaded], None] | None = None,
               progress: Callable[[int], None] | None = None, file_order: bool = False,
               read_progress: Callable[[int], None] | None = None) -> LoadSummary:
    """Produce the events of ``rows`` to the purchases topic (key = customer id, record
    timestamp = event time); count and report the rejected rows. Every event is first checked
    with the worker's own validation (currency, amounts, times), so what the worker would
    dead-letter is rejected here, with the same reason.

    The events are produced in event-time order (a stable sort: events of the same
    millisecond keep the rows' order), so the worker and a replay see the history as it
    happened, whatever order the file is in (CDNOW is sorted by customer: in file order, each
    customer's whole history would arrive at once, behind an event-time watermark already
    years ahead). ``file_order=True`` produces them in the rows' order instead.

    ``read_progress`` receives the number of rows read and checked since its last call (every
    1,000 rows and at the end); ``progress`` the number of events produced."""
    summary = LoadSummary()
    messages: list[Message] = []
    rules, now = settings.input_rules(), int(time.time() * 1000)
    for r in rows:
        summary.rows += 1
        if summary.rows % 1000 == 0:
            if read_progress:
                read_progress(1000)
            await asyncio.sleep(0)  # a Ctrl-C (which cancels this task) is not held to the end
        if r.event is not None:  # the worker's own checks: rejected now, not dead-lettered later
            key = str(r.event["customer_id"]).encode("utf-8")
            value = compact(orjson.dumps(r.event))
            verdict = validate(key, value, rules, now)
            if isinstance(verdict, Rejected):
                r = Loaded(r.row, reason=verdict.reason, detail=verdict.detail)
        if r.event is None:
            summary.rejected[r.reason or "?"] = summary.rejected.get(r.reason or "?", 0) + 1
            if on_reject:
                on_reject(r)
            continue
        summary.events += 1
        # record timestamp and sort key: the event time exactly as the worker reads it
        messages.append(Message(key, value, cast(Accepted, verdict).event.occurred_ms))
    if read_progress and summary.rows % 1000:
        read_progress(summary.rows % 1000)
    if not file_order:
        messages.sort(key=lambda m: m.timestamp_ms or 0)
    if not dry_run and messages:
        await produce(client_options(settings), topic or settings.purchases_topic,
                      messages, progress=progress)
    return summary


@dataclass
class ReplaySummary:
    """What a replay did."""

    records: int = 0
    applied: int = 0
    skipped_before_from: int = 0
    changes: int = 0
    dead_letters: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


def merge(summaries: Iterable[ReplaySummary]) -> ReplaySummary:
    """The sum of several replays' summaries (of disjoint partitions)."""
    out = ReplaySummary()
    for s in summaries:
        out.records += s.records
        out.applied += s.applied
        out.skipped_before_from += s.skipped_before_from
        out.changes += s.changes
        out.dead_letters += s.dead_letters
        for reason, n in s.dead_letter_reasons.items():
            out.dead_letter_reasons[reason] = out.dead_letter_reasons.get(reason, 0) + n
    return out


def partition_groups(partitions: int, processes: int) -> list[list[int]]:
    """Partitions ``0..partitions-1`` dealt round-robin to ``min(processes, partitions)``
    groups, one per replay process.

    >>> partition_groups(4, 2), partition_groups(3, 8), partition_groups(4, 1)
    ([[0, 2], [1, 3]], [[0], [1], [2]], [[0, 1, 2, 3]])
    """
    if partitions < 1 or processes < 1:
        raise ValueError(f"need partitions >= 1 and processes >= 1, got {partitions}, {processes}")
    n = min(processes, partitions)
    return [list(range(i, partitions, n)) for i in range(n)]


async def replay(settings: Settings, namespace: str, from_ms: int | None = None,
                 changes_topic: str | None = None, switch: bool = False,
                 progress: Callable[[int], None] | None = None,
                 batch: int = 2000, processes: int = 1, alias: str | None = None
                 ) -> ReplaySummary:
    """Replay the purchases topic into ``namespace`` (which should be new).

    ``changes_topic``: publish the replay's segment changes there (marked ``replay=true``),
    else they are counted and dropped; live topics are never written. ``switch``: when done,
    make ``namespace`` the one the name ``alias`` (default ``settings.namespace``: pass the
    configured name when ``settings`` were resolved through an earlier switch) resolves to
    (workers pick it up when they restart). ``progress``: called with the number of records
    applied since its last call. ``processes``: replay the partitions in this many processes (at most one per
    partition; :func:`partition_groups`), as that many workers of one consumer group would
    apply them; each process is one interpreter, so it uses as many cores. Recency, frequency
    and monetary per customer are the same in any case. The partitions move through event
    time together (``settings.replay_max_skew_s``, ``stream.interleave``), in one process or
    several; the stored segments and the changes still depend on when each partition's threshold
    refreshes saw the others, so they vary a little between runs (README "Replay and backfill").
    When all partitions are replayed, each is swept once (:func:`_final_sweep`).

    Raises
    ------
    ValueError
        When ``namespace`` is the live namespace itself, or already holds state, or the
        topic's partition count is not ``settings.partitions``.
    """
    if namespace == settings.namespace:
        raise ValueError("replay into a new namespace, not the live one")
    from stream.runner import store_for

    groups = partition_groups(settings.partitions, processes)
    store = store_for(settings.model_copy(update={"namespace": namespace}))
    try:
        await _claim(store, namespace, settings.partitions)
        try:
            if len(groups) == 1:
                summary = await _replay(settings, namespace, None, from_ms, changes_topic,
                                        progress, batch)
            else:
                summary = await _in_processes(store, settings, namespace, groups, from_ms,
                                              changes_topic, progress, batch)
            summary = merge([summary, await _final_sweep(settings, namespace, changes_topic)])
        except BaseException:
            meta = await store.partition_meta(range(settings.partitions))
            if all(offset < 0 for offset, _ in meta.values()):  # nothing written: free again
                await store.client.delete(replay_claim_key(namespace))
            raise
        if switch:
            await store.client.set(alias_key(alias or settings.namespace), namespace)
    finally:
        await store.client.aclose()
    return summary


async def _final_sweep(settings: Settings, namespace: str, changes_topic: str | None
                       ) -> ReplaySummary:
    """Once every partition is replayed: one sweep of each (as a live worker's timer does
    after the last event), so that each reaches the as-of time of all partitions' final
    watermarks and fires the customers due by then. A partition's last step scored at the
    minimum of the watermarks at that moment, which other partitions may have passed since:
    without this, CDNOW replays in 4 partitions ended 2 to 6 days before the live state."""
    from stream.services import build_services

    services = build_services(settings.model_copy(update={"namespace": namespace}),
                              replay=True)
    services.processor.outbox = bool(changes_topic)
    producer = (await started(AIOKafkaProducer(**client_options(settings), acks="all"))
                if changes_topic else None)
    summary = ReplaySummary()
    try:
        for p in range(settings.partitions):
            result = await services.processor.sweep(p)
            summary.changes += len(result.changes)
            if producer:
                await _drain(services.store, p, producer, changes_topic)
    finally:
        if producer:
            await producer.stop()
        await services.store.client.aclose()
    return summary


async def _claim(store: Any, namespace: str, partitions: int) -> None:
    """Refuse a namespace that holds state, then claim it (``SET NX``): of two replays
    started at once into one namespace, the second is refused here.

    Raises
    ------
    ValueError
        When the namespace holds state or another replay claimed it.
    """
    applied = await store.partition_meta(range(partitions))
    if any(offset >= 0 for offset, _ in applied.values()):
        raise ValueError(f"namespace {namespace!r} already holds state: replay into a new one")
    if not await store.client.set(replay_claim_key(namespace), str(time.time()), nx=True):
        raise ValueError(f"namespace {namespace!r} is the target of another replay (started or "
                         "failed): replay into a new one")


async def _in_processes(store: Any, settings: Settings, namespace: str,
                        groups: list[list[int]], from_ms: int | None, changes_topic: str | None,
                        progress: Callable[[int], None] | None, batch: int) -> ReplaySummary:
    """:func:`_replay` of each group of partitions in a process of its own (spawned: a fresh
    interpreter, nothing of this one's event loop or threads), which sends back its summary
    or its error through a pipe; progress from the applied offsets in Redis. When one fails
    or dies, the others are stopped (by PID) and the error raised; a process whose parent
    is gone stops itself (:func:`_exit_with_parent`)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    running: list[tuple[Any, Any, list[int]]] = []
    try:
        if changes_topic:
            await create_topics(client_options(settings), {changes_topic: 1})
        for group in groups:
            receive, send = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_replay_process, daemon=True, args=(
                send, os.getpid(), settings, namespace, group, from_ms, changes_topic, batch))
            process.start()
            send.close()
            running.append((process, receive, group))
        summaries: dict[int, ReplaySummary] = {}
        reported = 0
        while len(summaries) < len(running):
            for i, (process, receive, group) in enumerate(running):
                if i not in summaries and (receive.poll() or not process.is_alive()):
                    summaries[i] = _outcome(receive, process, group)
            if progress:
                meta = await store.partition_meta(range(settings.partitions))
                now_applied = sum(offset + 1 for offset, _ in meta.values())
                if now_applied > reported:
                    progress(now_applied - reported)
                    reported = now_applied
            if len(summaries) < len(running):
                await asyncio.sleep(0.2)
        return merge(summaries.values())
    finally:
        for process, receive, _ in running:
            if process.is_alive():
                process.terminate()  # SIGTERM to its PID
            process.join(10)
            if process.is_alive():  # stopped (SIGSTOP) or deaf to SIGTERM
                process.kill()
                process.join(10)
            receive.close()
        # after the processes; a Redis that does not answer must not hide the replay's own
        # error (the key expires a day after its last write anyway)
        with contextlib.suppress(RedisError):
            await store.client.delete(replay_frontier_key(namespace))


def _outcome(receive: Any, process: Any, group: list[int]) -> ReplaySummary:
    """A replay process's summary, or its error raised here: ValueError as ValueError (a
    refusal), anything else as RuntimeError with its type and message (the exception itself
    may not survive pickling); a process that died without a word, as RuntimeError."""
    try:
        message = receive.recv() if receive.poll(0.5) else None
    except (EOFError, OSError):
        message = None
    if message is None:
        process.join(1)
        raise RuntimeError(f"the replay process of partitions {group} exited with code "
                           f"{process.exitcode} before reporting")
    if message[0] == "ok":
        return cast(ReplaySummary, message[1])
    _, kind, text = message
    if kind == "ValueError":
        raise ValueError(text)
    raise RuntimeError(f"the replay process of partitions {group} failed: {kind}: {text}")


def _replay_process(send: Any, parent: int, settings: Settings, namespace: str,
                    partitions: list[int], from_ms: int | None, changes_topic: str | None,
                    batch: int) -> None:
    """One replay process of the process ``parent``: the replay's GC settings, then
    :func:`_replay` of its partitions; sends ``("ok", summary)`` or ``("error", exception
    type name, message)``."""
    _exit_with_parent(parent)
    try:
        import stream.services  # noqa: F401 - what the replay uses, before the GC freezes start-up
        from stream.allocator import settle_gc

        settle_gc(settings.gc_thresholds, settings.gc_freeze)
        summary = asyncio.run(_replay(settings, namespace, partitions, from_ms, changes_topic,
                                      None, batch))
        send.send(("ok", summary))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        kind = "ValueError" if isinstance(exc, ValueError) else type(exc).__name__
        send.send(("error", kind, str(exc)))
    finally:
        send.close()


def _exit_with_parent(parent: int) -> None:
    """Exit this process when its parent (PID) is gone (killed: its ``finally`` never ran), so
    that no replay process goes on writing alone; checked twice a second."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


async def _replay(settings: Settings, namespace: str, partitions: list[int] | None,
                  from_ms: int | None, changes_topic: str | None,
                  progress: Callable[[int], None] | None, batch: int) -> ReplaySummary:
    """The replay of ``partitions`` (None: all) in this process (see :func:`replay`)."""
    from stream.services import build_services

    target = settings.model_copy(update={"namespace": namespace})
    services = build_services(target, replay=True)
    # changes published nowhere are counted, not serialised into the outbox (dead letters of a
    # replay are dropped: the live worker dead-lettered them)
    services.processor.outbox = bool(changes_topic)
    # replay() refused a namespace with state and claimed this one (_claim) before calling
    own = list(range(settings.partitions)) if partitions is None else partitions
    kafka = client_options(settings)
    consumer = AIOKafkaConsumer(**kafka, enable_auto_commit=False,
                                group_id=None, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(**kafka, acks="all") if changes_topic \
        else None
    summary = ReplaySummary()
    if changes_topic:  # one partition, like segment-changes: consumers read it in order
        await create_topics(kafka, {changes_topic: 1})
    await started(consumer)
    # let aiokafka's no-group routine start: stopping the consumer before it ran raises
    # CancelledError out of stop() (aiokafka 0.14), which would hide a refusal below
    await asyncio.sleep(0)
    if producer:
        try:
            await started(producer)
        except BaseException:
            await consumer.stop()
            raise
    try:
        parts = sorted(consumer.partitions_for_topic(settings.purchases_topic) or [])
        if not parts:
            await consumer._client.force_metadata_update()
            parts = sorted(consumer.partitions_for_topic(settings.purchases_topic) or [])
        if not parts:
            raise ValueError(f"topic {settings.purchases_topic!r} has no partitions")
        tps = [TopicPartition(settings.purchases_topic, p) for p in parts]
        if len(parts) != settings.partitions:  # as the worker refuses (stream/app.py)
            raise ValueError(f"topic {settings.purchases_topic!r} has {len(parts)} partitions "
                             f"but RFM_PARTITIONS is {settings.partitions}: they must be equal")
        tps = [tp for tp in tps if tp.partition in own]
        ends = await _ends(kafka, tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # the partitions move through event time together, as a live worker applies them
        merge: EventTimeMerge[Any] = EventTimeMerge(range(settings.partitions),
                                                    settings.replay_max_skew_s * 1000)
        for tp in tps:
            if ends[tp] == 0:
                merge.exhaust(tp.partition)
        others = [p for p in range(settings.partitions) if p not in own]
        frontiers = replay_frontier_key(namespace)
        by_partition = {tp.partition: tp for tp in tps}

        async def exchange_frontiers() -> None:
            """Publish this process's frontiers in Redis; read those of the others."""
            pipe = services.store.client.pipeline(transaction=False)
            pipe.hset(frontiers, mapping={str(p): repr(merge.frontier(p)) for p in own})
            pipe.expire(frontiers, 86_400)  # gone a day after a replay whose parent was killed
            pipe.hmget(frontiers, [str(p) for p in others])
            for p, value in zip(others, (await pipe.execute())[2], strict=True):
                merge.set_frontier(p, float(value) if value is not None else -math.inf)

        async def one(tp: TopicPartition, msgs: list[Any]) -> None:
            # the processor checks that offsets follow on from the namespace's (GapError)
            raws = [RawRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in msgs]
            skip = ({m.offset for m in msgs if _event_ms(m.value) < from_ms}
                    if from_ms is not None else None)
            result = await services.processor.process(tp.partition, raws, skip=skip)
            summary.records += len(msgs)
            summary.skipped_before_from += len(skip or ())
            summary.applied += result.applied
            summary.changes += len(result.changes)
            summary.dead_letters += len(result.dead_letters)
            for d in result.dead_letters:
                summary.dead_letter_reasons[d.reason] = (
                    summary.dead_letter_reasons.get(d.reason, 0) + 1)
            if changes_topic:  # else nothing was written to the outbox
                await _drain(services.store, tp.partition, producer, changes_topic)
            if progress:
                progress(len(msgs))

        while not all(merge.drained(tp.partition) for tp in tps):
            need = [tp for tp in tps
                    if merge.empty(tp.partition) and not merge.exhausted(tp.partition)]
            if need:
                fetched = await consumer.getmany(*need, timeout_ms=1000, max_records=batch)
                for tp, msgs in fetched.items():
                    msgs = [m for m in msgs if m.offset < ends[tp]]
                    # record timestamps as event times (a record without one counts as the
                    # one before it: running maxima)
                    merge.add(tp.partition, msgs,
                              [-1 if m.timestamp is None else m.timestamp for m in msgs])
                for tp in need:
                    if await consumer.position(tp) >= ends[tp]:
                        merge.exhaust(tp.partition)
            if others:
                await exchange_frontiers()
            ready = merge.release()
            if ready:  # partitions concurrently: one plans while another waits for Redis
                await asyncio.gather(*(one(by_partition[p], msgs) for p, msgs in ready.items()))
            elif not need:  # waiting for another process's partitions to catch up
                await asyncio.sleep(0.005)
        if others:  # drained: the others no longer wait for these partitions
            await exchange_frontiers()
        for p in own:
            await _drain(services.store, p, producer, changes_topic)
    finally:
        await consumer.stop()
        if producer:
            await producer.stop()
        await services.store.client.aclose()
    return summary


ENDS_TIMEOUT_S = 30.0  # for the end offsets a replay stops at


async def _ends(kafka: dict[str, Any], tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The end offset of each partition as of now, from fetch responses of a consumer of its
    own (the local broker's ListOffsets is wrong: docs/local-broker.md)."""
    consumer = await started(AIOKafkaConsumer(**kafka, enable_auto_commit=False,
                                              group_id=None, auto_offset_reset="earliest"))
    ends: dict[TopicPartition, int] = {}
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + ENDS_TIMEOUT_S
        while len(ends) < len(tps) and time.monotonic() < deadline:
            await consumer.getmany(*tps, timeout_ms=200, max_records=1)
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is not None:
                    ends[tp] = hw
    finally:
        await consumer.stop()
    if len(ends) < len(tps):  # not 0: the replay would skip them and "succeed" with nothing
        missing = sorted(tp.partition for tp in tps if tp not in ends)
        raise TimeoutError(f"the end offsets of partitions {missing} were not read within "
                           f"{ENDS_TIMEOUT_S:g} s (the broker did not answer the fetches)")
    return ends


def _event_ms(value: bytes | None) -> float:
    """Event time of a raw record (ms), or +inf when it has none (such a record is applied
    or dead-lettered as usual)."""
    from datetime import datetime

    try:
        text = orjson.loads(value or b"")["occurred_at"]
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000
    except Exception:  # the processor dead-letters it with the precise reason
        return float("inf")


async def _drain(store, partition: int, producer: AIOKafkaProducer | None,  # type: ignore[no-untyped-def]
                 topic: str | None) -> None:
    """Empty a partition's outbox: changes go to the replay's topic (if any); dead letters of
    a replay were dead-lettered live already and are dropped."""
    while True:
        entries = await store.outbox_read(partition, 1000)
        if not entries:
            return
        if producer and topic:
            await (await BatchSender(producer).send(topic, [
                (e.key.encode("utf-8"), e.value.encode("utf-8"))
                for e in entries if e.kind == "c" and e.key is not None]))
        await store.outbox_ack(partition, [e.entry_id for e in entries])
