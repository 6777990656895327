"""Batch delivery: the purchases topic goes from faust's consumer to the processor one fetched
batch at a time, not one event at a time.

faust delivers each record through its conductor, a channel queue and a stream, and its fetch
loop waits on two new tasks per record (``Consumer._drain_messages``: ``wait_first(callback,
suspend_flow.wait())``): about 80-140 µs per record on a 2-core machine, more than the
service's own work per record. Here faust still owns the group (membership, assignment,
rebalances, heartbeats), the fetching (``Consumer.getmany``: flow control, generations, active
partitions, read offsets) and the offset commits (each record is tracked and acknowledged with
faust's own ``track_message``/``ack``, so its commit timer and ``stream_wait_empty`` on
revocation work as with an agent); only the per-record hand-over is replaced, for the topics
given a batch handler. Records of other topics (faust's own) take the usual path.

Event-time alignment (``BatchTransport.max_skew_ms`` > 0): the records of a partition more
than that much event time (record timestamps; one after the wall clock counts as now) ahead of
the consumer's other partitions are held back, not tracked, until those catch up
(``stream.interleave.LiveAlignment``), and so are those past the partitions of the group's
other workers, whose frontiers come through ``BatchTransport.frontier_exchange`` (fetched
records are released against reports at most :data:`FRESH_S` old; again when records stay
held, and after each release that leaves some; else every :data:`EXCHANGE_EVERY_S`); a
partition holding :data:`MAX_HELD` records is paused (faust's ``pause_partitions``) until it
holds half as many. Held records are not acknowledged, so a rebalance, which drops them,
loses nothing: they are fetched again from the committed offset (or re-read as a gap). In
steady state nothing is held.

Wiring (``stream/app.py``): ``app.transport = BatchTransport(app.conf.broker_consumer, app)``,
then ``app.transport.batch_handlers[topic] = handler`` and ``app.topics.add(topic)`` (the
subscription). Written against faust-streaming 0.15's ``Consumer._drain_messages``; a test
runs a real worker through it (``tests/integration/test_worker.py``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable
from time import monotonic, time
from typing import Any, ClassVar, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message

from stream.interleave import LiveAlignment, Report, not_caught_up

BatchHandler = Callable[[list[Message]], Awaitable[None]]
# (topic, this worker's reports per partition) -> the other workers' (stream/app.py)
FrontierExchange = Callable[[str, dict[int, Report]],
                           Awaitable[dict[int, tuple[float, int, int]]]]
MAX_HELD = 10_000  # records a partition may hold back before its fetching is paused
EXCHANGE_EVERY_S = 1.0  # reports are exchanged at least this often (more often while held)
FRESH_S = 0.05  # what is fetched is released against the others' reports of at most this age
# a fetch waits at most this long for records while records are held: what releases them may be
# another worker's next report, not a fetch (faust's 1 s made two workers on a backlog move
# one round, a week of event time, per second: CDNOW took 115 s instead of ~14)
HELD_FETCH_WAIT_S = 0.02


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread, with the fetch wait of the transport's settings: faust
    hard-codes ``fetch_max_wait_ms=1500``, and a broker that answers an empty fetch only when
    that wait ends (the local one does) delays records that arrive meanwhile by up to 1.5 s."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # read by AIOKafkaConsumer.start() when it creates its fetcher
        consumer._fetch_max_wait_ms = cast(BatchTransport, transport).fetch_max_wait_ms
        return consumer

    async def on_start(self) -> None:
        await super().on_start()  # creates and starts the aiokafka consumer and its coordinator
        leave_group_from_generation_zero(self._consumer._coordinator)


def leave_group_from_generation_zero(coordinator: Any) -> None:
    """Make an aiokafka group coordinator leave its group on close at generation 0 too.

    aiokafka 0.14 sends its LeaveGroup request only when ``generation > 0``
    (``GroupCoordinator._maybe_leave_group``): on Kafka the first generation is 1. The local
    broker (Tansu) numbers it 0, so the members of a group's first generation (workers started
    together on a new stack) never left it when stopped: the others took over their partitions
    only after the session timeout (~45 s instead of ~17 s: a fresh user's finding). A
    coordinator without a group (``NoGroupCoordinator``), or with a static membership
    (``group_instance_id``), is left as it is."""
    original = getattr(coordinator, "_maybe_leave_group", None)
    if original is None or getattr(coordinator, "_group_instance_id", None) is not None:
        return

    async def maybe_leave_group() -> None:
        if coordinator.generation == 0 and coordinator.member_id:
            coordinator.generation = 1  # what aiokafka requires; LeaveGroup sends no generation
        await original()

    coordinator._maybe_leave_group = maybe_leave_group


class BatchConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer, with batch delivery for the transport's batch topics."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - faust's loop
        transport = cast(BatchTransport, self.transport)
        handlers: dict[str, BatchHandler] = transport.batch_handlers
        alignment = _Alignment(self, handlers, transport.max_skew_ms,
                               transport.frontier_exchange)
        transport.alignments = alignment.by_topic  # for the worker's metrics
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        inbound = self.app.monitor.stream_inbound_time

        async def deliver(topic: str, messages: list[Message]) -> None:
            # what a stream tells faust's monitor per event: the partitions are being
            # processed (else faust's consumer thread logs them as stalled)
            now = monotonic()
            for message in messages:
                self.track_message(message)
                inbound[message.tp] = now
            await handlers[topic](messages)
            for message in messages:
                self.ack(message)

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                batches: dict[str, list[Message]] = {}
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in self.getmany(timeout=alignment.fetch_wait_s):
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and message.offset < r_offset:
                            continue  # already read (faust drops these too)
                        gap = message.offset - (r_offset or 0)
                        if gap > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, message.offset)
                        if message.topic in handlers:
                            batches.setdefault(message.topic, []).append(message)
                        else:
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        set_read_offset(tp, message.offset)
                    self.diag.unset_flag(CONSUMER_FETCHING)
                assigned = alignment.follow_assignment()
                for topic, messages in batches.items():
                    if topic in alignment.by_topic:
                        alignment.add(topic, messages)
                    else:
                        await deliver(topic, messages)
                await alignment.deliver_ready(assigned, deliver)
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)


class _Alignment:
    """The event-time alignment of a :class:`BatchConsumer`'s batch topics (the module
    docstring): their fetched records go through a :class:`LiveAlignment` per topic, reset at
    each rebalance, and come out to ``deliver`` when the other partitions allow."""

    def __init__(self, consumer: BatchConsumer, topics: Iterable[str], max_skew_ms: float,
                 exchange: FrontierExchange | None = None):
        self.consumer = consumer
        self.by_topic = {topic: LiveAlignment[Message](max_skew_ms)
                         for topic in topics if max_skew_ms}
        self.exchange = exchange
        self.exchanged: dict[str, float] = {}  # per topic: monotonic time of the last exchange
        # per topic: the partitions last reported with a finite frontier (not caught up)
        self.reported_behind: dict[str, set[int]] = {}
        self.exchange_failing = False
        self.generation: int | None = None
        self.next_offset: dict[Any, int] = {}  # per partition: after the last one fetched
        self.paused: set[Any] = set()

    @property
    def fetch_wait_s(self) -> float:
        """How long the next fetch may wait for records (s): faust's 1 s, or
        :data:`HELD_FETCH_WAIT_S` while records are held."""
        return HELD_FETCH_WAIT_S if any(a.holding for a in self.by_topic.values()) else 1.0

    def follow_assignment(self) -> set[Any]:
        """The consumer's assignment; after a rebalance, what was held is dropped: it was not
        acknowledged, so it is fetched again (from the committed offsets, or re-read as a gap
        by the handler)."""
        c = self.consumer
        if not self.by_topic:
            return set()
        assigned = c.assignment()
        if self.generation != c.app.consumer_generation_id or any(
                a.partitions != {tp.partition for tp in assigned if tp.topic == topic}
                for topic, a in self.by_topic.items()):
            self.generation = c.app.consumer_generation_id
            for topic, aligner in self.by_topic.items():
                aligner.reset(tp.partition for tp in assigned if tp.topic == topic)
            c.resume_partitions(self.paused & assigned)
            self.paused.clear()
            self.next_offset.clear()
        return assigned

    def add(self, topic: str, messages: list[Message]) -> None:
        """Fetched records of ``topic`` (any partitions, offset order within each)."""
        aligner = self.by_topic[topic]
        by_tp: dict[Any, list[Message]] = {}
        for message in messages:
            by_tp.setdefault(message.tp, []).append(message)
        now, wall_ms = monotonic(), time() * 1000
        inbound = self.consumer.app.monitor.stream_inbound_time
        for tp, msgs in by_tp.items():
            inbound[tp] = now  # held back is being processed, for faust's monitor
            if tp.partition in aligner.partitions:
                aligner.add(tp.partition, msgs,
                            [m.timestamp * 1000 if m.timestamp else -1 for m in msgs], wall_ms)
                self.next_offset[tp] = msgs[-1].offset + 1

    def caught_up(self, tp: Any) -> bool:
        """Nothing more to fetch from ``tp`` now: its next offset reached the high watermark."""
        # the read offset is the next one to read after a seek (faust), else the last read
        nxt = self.next_offset.get(tp, self.consumer._read_offset[tp] or 0)
        try:
            hw = self.consumer.highwater(tp)
        except AssertionError:  # aiokafka: no longer assigned (reset on the next round)
            return False
        return hw is not None and nxt >= hw

    async def deliver_ready(self, assigned: set[Any],
                            deliver: Callable[[str, list[Message]], Awaitable[None]]) -> None:
        """Deliver, round by round, what the alignment releases; pause the fetching of a
        partition holding :data:`MAX_HELD` records, resume it at half as many."""
        c = self.consumer
        for topic, aligner in self.by_topic.items():
            tps = {tp.partition: tp for tp in assigned if tp.topic == topic}
            forced, asked = aligner.forced, False
            # records just fetched are not released against reports older than FRESH_S: a
            # partition another worker had not reported yet, or reported caught up before a
            # backlog arrived, would hold nothing back (at most one round trip per FRESH_S)
            if aligner.holding:
                await self.exchange_frontiers(
                    topic, aligner, monotonic() - self.exchanged.get(topic, -1e9) >= FRESH_S)
            while True:
                ready = aligner.release([p for p, tp in tps.items() if self.caught_up(tp)],
                                        monotonic())
                if ready:
                    # what is left is reported before what was released is applied: the
                    # other workers apply theirs meanwhile (as this worker's partitions of one
                    # release are applied concurrently), not one after the other
                    await self.exchange_frontiers(topic, aligner, aligner.holding)
                    await deliver(topic, [m for p in sorted(ready) for m in ready[p]])
                elif aligner.holding and not asked:  # held: maybe by the others' old reports
                    await self.exchange_frontiers(topic, aligner, True)
                    asked = True
                else:
                    break
            # a partition reported with a held record's time that is now caught up with nothing
            # held is reported again at once (a trickle of old records would otherwise be seen
            # as its last record's time until the next exchange, which the next record makes)
            behind = self.reported_behind.get(topic, set())
            stale = not aligner.holding and any(
                p in behind and self.caught_up(tp) for p, tp in tps.items())
            await self.exchange_frontiers(topic, aligner, stale)  # else at least every second
            if aligner.forced > forced:
                c.log.warning("%s: %d records held back for event-time alignment released "
                              "after %.0f s without progress (a partition is not being "
                              "fetched, or another worker's does not move)", topic,
                              aligner.forced - forced, aligner.stall_s)
            for p, tp in tps.items():
                if tp not in self.paused and aligner.held(p) >= MAX_HELD:
                    c.log.info("%s[%d] is ahead of the other partitions in event time: "
                               "fetching it paused", topic, p)
                    c.pause_partitions([tp])
                    self.paused.add(tp)
                elif tp in self.paused and aligner.held(p) < MAX_HELD // 2:
                    c.log.info("%s[%d]: fetching it resumed", topic, p)
                    c.resume_partitions([tp])
                    self.paused.discard(tp)

    async def exchange_frontiers(self, topic: str, aligner: LiveAlignment[Message],
                                 needed: bool) -> bool:
        """Publish this worker's reports of ``topic``'s partitions and hold against the other
        workers' from now on, when ``needed`` or :data:`EXCHANGE_EVERY_S` after the last
        time; whether it did. When the exchange fails (Redis), the other workers' partitions hold nobody
        back until it works again (a warning when it starts failing)."""
        now = monotonic()
        if self.exchange is None or (
                not needed and now - self.exchanged.get(topic, -1e9) < EXCHANGE_EVERY_S):
            return False
        self.exchanged[topic] = now
        try:
            caught_up = [tp.partition for tp in self.consumer.assignment()
                         if tp.topic == topic and self.caught_up(tp)]
            reports = aligner.reports(caught_up)
            self.reported_behind[topic] = {p for p, r in reports.items()
                                           if r.frontier_ms != math.inf}
            others = await self.exchange(topic, reports)
        except Exception as exc:  # noqa: BLE001 - consuming goes on, aligned per worker
            if not self.exchange_failing:
                self.consumer.log.warning("%s: event-time frontiers not exchanged with the "
                                          "other workers (%s: %s); aligning this worker's "
                                          "partitions only until it works", topic,
                                          type(exc).__name__, exc)
            self.exchange_failing = True
            others = {}
        else:
            if self.exchange_failing:
                self.consumer.log.info("%s: event-time frontiers exchanged again", topic)
            self.exchange_failing = False
            others = await self._confirm_caught_up(topic, aligner, others)
        aligner.set_external(others, monotonic())
        return True

    async def _confirm_caught_up(self, topic: str, aligner: LiveAlignment[Message],
                                 others: dict[int, tuple[float, int, int]]
                                 ) -> dict[int, tuple[float, int, int]]:
        """``others`` with a ``+inf`` report held as ``-inf`` (until its owner reports again)
        where the partition's end offset is past its applied offset, when this worker holds
        records older than the skew (a backlog: live records do not wait for the check).
        One ListOffsets request; if it fails, the reports are taken as they are."""
        oldest = aligner.oldest_held_ms()
        caught = [p for p, r in others.items() if r[0] == math.inf]
        if not caught or oldest is None or oldest >= time() * 1000 - aligner.slack_ms:
            return others
        try:
            ends = await self.consumer.highwaters(*(TP(topic, p) for p in caught))
        except Exception as exc:  # noqa: BLE001 - a check only: the reports stand
            self.consumer.log.warning("%s: end offsets of %s not read (%r): their reports "
                                      "of caught up stand", topic, caught, exc)
            return others
        behind = not_caught_up(others, {tp.partition: n for tp, n in ends.items()})
        return {p: (-math.inf, r[1], r[2]) if p in behind else r for p, r in others.items()}


class BatchTransport(faust_aiokafka.Transport):
    """faust's aiokafka transport with :class:`BatchConsumer`; ``batch_handlers`` maps a topic
    name to the coroutine function that takes each fetched batch of its records;
    ``fetch_max_wait_ms``: how long the broker may hold a fetch that found nothing (ms);
    ``max_skew_ms``: the event-time alignment's slack (0: none); ``frontier_exchange``: how
    the alignment learns the frontiers of the partitions the group's other workers own (None:
    it does not); ``alignments``: the alignment of each batch topic, once consuming (what
    each partition holds back)."""

    Consumer: ClassVar[type] = BatchConsumer

    def __init__(self, *args: Any, fetch_max_wait_ms: int = 100, max_skew_ms: float = 0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batch_handlers: dict[str, BatchHandler] = {}
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.max_skew_ms = max_skew_ms
        self.frontier_exchange: FrontierExchange | None = None
        self.alignments: dict[str, LiveAlignment[Message]] = {}

