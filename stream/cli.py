"""``rfm-stream``: the command line (click, as faust's own).

Every command reads the ``RFM_*`` environment variables (README "Configuration"); the state
namespace is resolved through ``rfm-stream replay --switch`` aliases.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

T = TypeVar("T")


class _Running:
    """The coroutine :func:`_run` runs, as a task, and whether a signal cancelled it."""

    task: asyncio.Task[Any] | None = None
    interrupted = False


def _as_ctrl_c(signum: int, frame: Any) -> None:
    """A SIGTERM handler that does what Ctrl-C does: SIGINT's handler (asyncio's, which
    cancels the main task, or Python's default). When SIGINT is ignored (a job started with
    ``&`` from a script) asyncio installed no handler: the same, here (the first signal
    cancels the task :func:`_run` runs, which then raises KeyboardInterrupt; another raises
    it at once)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
        return
    task = _Running.task
    if task is None or task.done() or _Running.interrupted:
        raise KeyboardInterrupt
    _Running.interrupted = True
    task.get_loop().call_soon_threadsafe(task.cancel)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a new event loop (``asyncio.run``); KeyboardInterrupt when
    :func:`_as_ctrl_c` cancelled it."""
    async def main() -> T:
        _Running.task = asyncio.current_task()
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if _Running.interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        _Running.task, _Running.interrupted = None, False


def _settings(resolve: bool = True) -> Any:
    """The settings (``RFM_*`` and ``RFM_CONFIG_FILE``); with ``resolve``, the namespace
    follows a ``replay --switch`` alias (which needs Redis).

    Raises
    ------
    click.ClickException
        On invalid settings or an unreachable Redis, with the reason.
    """
    import tomllib

    from pydantic import ValidationError
    from redis.exceptions import RedisError

    from stream.runner import resolve_namespace
    from stream.settings import Settings, explain

    try:
        settings = Settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid settings:\n  {explain(exc)}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # the config file's text
        raise click.ClickException(
            f"invalid settings: {os.environ.get('RFM_CONFIG_FILE')}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"invalid settings: {exc}") from exc
    if not resolve:
        return settings
    try:
        return resolve_namespace(settings)
    except RedisError as exc:
        raise click.ClickException(
            f"Redis unreachable at the configured RFM_REDIS_URL: {exc}") from exc
    except ValueError as exc:  # an alias written by hand
        raise click.ClickException(str(exc)) from exc


def _check_layout(settings: Any) -> str:
    """Refuse, before the worker starts, a namespace written with the other population layout
    (``RFM_POPULATION_LAYOUT``; ``RedisStore.check_layout``); returns the namespace's layout
    (with ``auto``, the one it holds, recorded now for a new namespace).

    Raises
    ------
    click.ClickException
        With what to set, or when Redis is unreachable.
    """
    from redis.exceptions import RedisError

    from state.store import LayoutError
    from stream.runner import store_for

    async def check() -> str:
        store = store_for(settings)
        try:
            await store.check_layout(range(settings.partitions))
            return await store.layout()
        finally:
            await store.client.aclose()

    try:
        return asyncio.run(check())
    except LayoutError as exc:
        raise click.ClickException(str(exc)) from exc
    except RedisError as exc:
        raise click.ClickException(
            f"Redis unreachable at the configured RFM_REDIS_URL: {exc}") from exc


def _version(ctx: click.Context, asked: bool) -> None:
    """``--version``: the release and the format of the customer values it writes (README
    "Upgrading"); imported only when asked, as the CLI imports what a command needs."""
    if not asked or ctx.resilient_parsing:
        return
    from importlib.metadata import version

    from state.codec import FORMAT

    click.echo(f"rfm-stream {version('rfm-stream')} (customer values: writes format {FORMAT} "
               f"unless RFM_STATE_FORMAT asks for 2 or 3, reads 1-{FORMAT})")
    ctx.exit()


def _kafka_errors() -> tuple[type[BaseException], ...]:
    from aiokafka.errors import KafkaError

    return (KafkaError, OSError)


def _epoch_ms(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not an ISO-8601 date-time: {exc}") from exc
    if t.tzinfo is None:
        raise click.BadParameter(f"{text!r} needs a UTC offset, e.g. 1998-01-01T00:00:00Z")
    return int(t.timestamp() * 1000)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  rfm-stream demo                                   # CDNOW end to end, embedded stack
  rfm-stream worker                                 # the stream worker (RFM_* settings)
  rfm-stream load retail.csv --format online-retail --currency GBP
  rfm-stream replay --namespace rebuild-2026 --switch
  rfm-stream customer 00042
  rfm-stream export --out customers.parquet --as-of 1998-06-30T00:00:00Z
  rfm-stream forget 00042
  rfm-stream changes --follow                       # segment changes as they happen
""")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _param, value: _version(ctx, value),
              help="Show the version and the customer value format, and exit.")
def main() -> None:
    """Real-time RFM customer segmentation on Kafka and Redis."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run the stream worker (options after it go to faust's worker command)."""
    asking = any(a in ("--help", "-h") for a in ctx.args)
    if asking and "-h" in ctx.args:  # faust's -h is --web-host: give the help people expect
        ctx.args[ctx.args.index("-h")] = "--help"
    settings = _settings(resolve=not asking)
    if not asking:  # the log names the namespace the worker writes (after a replay --switch)
        configured = _settings(resolve=False).namespace
        line = (f"rfm-stream worker: state namespace {settings.namespace!r}"
                + (f" (RFM_NAMESPACE={configured!r} resolves to it)"
                   if configured != settings.namespace else ""))
        layout = None
        try:
            layout = _check_layout(settings)
        finally:  # the namespace is named, whatever the check says
            click.echo(line + (f", populations {layout}" if layout else ""), err=True)
    os.environ["RFM_NAMESPACE"] = settings.namespace
    from stream.allocator import tune_gc, tune_malloc
    tune_malloc(settings.malloc_mmap_threshold_bytes, settings.malloc_arena_max)
    tune_gc(settings.gc_thresholds)
    from stream.app import app
    from stream.app import settings as app_settings

    sys.argv = ["rfm-stream", "worker", "--loglevel", "info", "--web-bind", app_settings.web_bind,
                "--web-port", str(app_settings.web_port), *ctx.args]
    app.main()


@main.command()
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False),
              help="Output directory.")
def demo(out: str) -> None:
    """The whole pipeline on the CDNOW purchases, on an embedded broker and Redis."""
    from stream import demo as demo_mod

    _settings(resolve=False)  # invalid settings: one line each, before anything starts
    sys.exit(demo_mod.main(out))


@main.command()
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Where the servers write their logs (default: a temporary directory, "
              "removed when they stop). Both keep their data in memory only.")
def stack(workdir: str | None) -> None:
    """Start the embedded broker and Redis (pip install '.[local]') on free loopback ports,
    create the topics, and print the RFM_* settings that point at them; both stop on Ctrl-C
    or SIGTERM (and when this process dies), and what they held is gone."""
    import signal

    from stream import localstack
    from stream.demo import ensure_topics

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        with localstack.running(Path(workdir) if workdir else None) as s:
            settings = _settings(resolve=False).model_copy(
                update={"kafka_url": s.kafka_url, "redis_url": s.redis_url})
            _run(ensure_topics(settings))
            click.echo(f"export RFM_KAFKA_URL={s.kafka_url} RFM_REDIS_URL={s.redis_url}")
            click.echo(f"broker pid {s.broker.pid}, redis-server pid {s.redis.pid}, files in "
                       f"{s.workdir}; topics created with RFM_PARTITIONS={settings.partitions}."
                       " Ctrl-C stops both.", err=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    except localstack.LocalStackError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("directory", default="docs/schemas", type=click.Path(file_okay=False))
def schemas(directory: str) -> None:
    """Write the events' JSON Schemas."""
    from stream.events import write_schemas

    for p in write_schemas(Path(directory)):
        click.echo(p)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", default="event", show_default=True,
              type=click.Choice(["event", "cdnow", "online-retail", "mapped"]),
              help="Row layout (see README 'Loading files').")
@click.option("--map", "mapping", multiple=True, metavar="FIELD=COLUMN",
              help="For --format mapped: which column holds an event field (repeatable).")
@click.option("--timezone", default="UTC", show_default=True,
              help="Time zone of date-times written without one.")
@click.option("--currency", default=None, help="Currency of the amounts [default: RFM_CURRENCY].")
@click.option("--topic", default=None, help="Topic to produce to [default: RFM_PURCHASES_TOPIC].")
@click.option("--rejects", type=click.Path(dir_okay=False, path_type=Path),
              help="Write rejected rows (row number, reason, detail) to this JSON Lines file.")
@click.option("--dry-run", is_flag=True, help="Read and check the file; produce nothing.")
@click.option("--file-order", is_flag=True,
              help="Produce in the file's row order [default: event-time order].")
def load(file: Path, fmt: str, mapping: tuple[str, ...], timezone: str, currency: str | None,
         topic: str | None, rejects: Path | None, dry_run: bool, file_order: bool) -> None:
    """Load a CSV, JSON Lines or Parquet FILE into the purchases topic.

    Every row becomes an event (key = customer id, record timestamp = event time) or a
    rejected row with its reason; the summary counts each. Events are produced in event-time
    order (rows of the same time keep their order), unless --file-order. Event ids are a hash
    of the row, so loading a file twice is harmless for customers with at most
    RFM_RECENT_EVENT_IDS (32) events in it (README, "Loading files").
    """
    from tqdm import tqdm

    from stream.loaders import LoadOptions, load_file
    from stream.replay import load as load_events

    settings = _settings(resolve=False)  # loading touches Kafka only
    pairs = dict(m.split("=", 1) for m in mapping if "=" in m)
    if fmt == "mapped" and not pairs:
        raise click.BadParameter("--format mapped needs --map FIELD=COLUMN", param_hint="--map")
    if currency and currency.upper() != settings.currency:
        click.echo(f"warning: --currency {currency} differs from RFM_CURRENCY "
                   f"{settings.currency}: the worker rejects these events "
                   "(unsupported_currency); set RFM_CURRENCY to match", err=True)
    if len(pairs) != len(mapping):
        raise click.BadParameter("use FIELD=COLUMN", param_hint="--map")
    opts = LoadOptions(fmt, timezone, currency or settings.currency, settings.currency_decimals,
                       pairs or None)
    out = rejects.open("w", encoding="utf-8") if rejects else None

    def on_reject(r: Any) -> None:
        if out:
            out.write(json.dumps({"row": r.row, "reason": r.reason, "detail": r.detail}) + "\n")

    bars: dict[str, Any] = {}  # "read" (rows read and checked), then "produce" (events)

    def advance(name: str, unit: str) -> Callable[[int], None]:
        def update(n: int) -> None:
            if name not in bars:
                for bar in bars.values():  # the previous phase is over
                    bar.close()
                bars[name] = tqdm(desc=name, unit=unit)
            bars[name].update(n)
        return update

    try:
        summary = _run(load_events(settings, load_file(file, opts), topic, dry_run,
                                   on_reject, advance("produce", "ev"), file_order,
                                   advance("read", "row")))
    except (*_kafka_errors(), ValueError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    finally:
        for bar in bars.values():
            bar.close()
        if out:
            out.close()
    def n(count: int, noun: str) -> str:
        return f"{count:,} {noun}{'' if count == 1 else 's'}"

    click.echo(f"{n(summary.rows, 'row')}: {n(summary.events, 'event')}"
               f"{' (dry run: none produced)' if dry_run else ''}, "
               f"{sum(summary.rejected.values()):,} rejected")
    for reason, count in sorted(summary.rejected.items()):
        click.echo(f"  {reason}: {count:,}")
    if summary.rejected:
        click.echo("(rows are numbered from 1 after any header, as in --rejects)")


@main.command()
@click.option("--namespace", required=True, help="New state namespace to rebuild into.")
@click.option("--from", "from_time", default=None, metavar="ISO-TIME",
              help="Only events at or after this event time are applied.")
@click.option("--changes-topic", default=None,
              help="Publish the replay's segment changes here (marked replay=true).")
@click.option("--switch", is_flag=True,
              help="When done, make RFM_NAMESPACE resolve to the new namespace.")
@click.option("--processes", type=click.IntRange(1), default=1, show_default=True,
              help="Replay the partitions in this many processes (at most one per partition), "
              "one core each.")
def replay(namespace: str, from_time: str | None, changes_topic: str | None,
           switch: bool, processes: int) -> None:
    """Rebuild state from the purchases topic into a new namespace, in event time."""
    import redis.exceptions
    from tqdm import tqdm

    from stream.allocator import settle_gc
    from stream.replay import replay as run_replay

    configured, settings = _settings(resolve=False), _settings()
    if namespace in (configured.namespace, settings.namespace):
        raise click.BadParameter(f"{namespace!r} is the live namespace (or its alias): replay "
                                 "into a new one", param_hint="--namespace")
    import stream.services  # noqa: F401 - what the replay uses, before the GC freezes start-up

    settle_gc(settings.gc_thresholds, settings.gc_freeze)  # the worker's GC settings
    # SIGTERM stops a replay as Ctrl-C does: its processes stopped, its claim released if
    # nothing was written, the partial namespace named
    try:
        previous = signal.signal(signal.SIGTERM, _as_ctrl_c)
    except ValueError:  # not the main thread (an embedding program): its own signals apply
        previous = None
    try:
        with tqdm(desc="replay", unit="ev", delay=1.0) as bar:  # none for a quick refusal
            s = _run(run_replay(settings, namespace, _epoch_ms(from_time), changes_topic,
                                switch, bar.update, processes=processes,
                                alias=configured.namespace))
    except ValueError as exc:  # a refusal: nothing was written
        raise click.ClickException(str(exc)) from exc
    except (*_kafka_errors(), RuntimeError, TimeoutError, redis.exceptions.RedisError,
            KeyboardInterrupt) as exc:
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else \
            f"{type(exc).__name__}: {exc}"
        raise click.ClickException(f"{what} ({_left_behind(settings, namespace)})") from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    click.echo(f"{s.records:,} records: {s.applied:,} applied, {s.skipped_before_from:,} before "
               f"--from, {s.dead_letters:,} dead letters; {s.changes:,} segment changes"
               f"{' published to ' + changes_topic if changes_topic else ' (not published)'}")
    for reason, n in sorted(s.dead_letter_reasons.items()):
        click.echo(f"  dead letters ({reason}): {n:,} (not re-sent to the dead-letter topic)")
    layout = _check_layout(settings.model_copy(update={"namespace": namespace}))
    click.echo(f"{namespace!r} keeps its populations as {layout} (RFM_POPULATION_LAYOUT)")
    if switch:
        click.echo(f"{configured.namespace!r} now resolves to {namespace!r}: restart the workers")


def _left_behind(settings: Any, namespace: str) -> str:
    """What a failed or interrupted replay left in ``namespace``, for its error message."""
    from stream.runner import store_for

    async def written() -> bool:
        store = store_for(settings.model_copy(update={"namespace": namespace}))
        try:
            meta = await store.partition_meta(range(settings.partitions))
            return any(offset >= 0 for offset, _ in meta.values())
        finally:
            await store.client.aclose()

    try:
        wrote = _run(asyncio.wait_for(written(), 5))
    except Exception:  # noqa: BLE001 - Redis may be what failed
        return f"what was applied, if anything, stays in {namespace!r}: replay into a new namespace"
    if wrote:
        return f"what was applied stays in {namespace!r}: replay into a new namespace"
    return f"nothing was written: {namespace!r} can be replayed into again"


@main.command()
@click.argument("customer_id")
def customer(customer_id: str) -> None:
    """Show one customer: state, scores at the as-of time, segment, cluster."""
    settings = _settings()  # first: bad settings are a clean error
    from stream.services import build_services, customer_json

    async def show() -> tuple[dict[str, Any], int]:
        services = build_services(settings)
        try:
            return await customer_json(services, customer_id)
        finally:
            await services.store.client.aclose()

    body, status = _run(show())
    click.echo(json.dumps(body, indent=2))
    if status != 200:
        sys.exit(1)


@main.command()
def segments() -> None:
    """Customers per segment, with each segment's strategy."""
    from stream.runner import store_for
    from stream.segments import SegmentTable

    settings = _settings()

    async def counts() -> dict[str, int]:
        store = store_for(settings)
        try:
            return await store.segment_counts(range(settings.partitions))
        finally:
            await store.client.aclose()

    got = _run(counts())
    table = SegmentTable.load(settings.segment_table)
    click.echo(f"{'segment':<22}{'customers':>10}  strategy")
    for name, seg in table.segments.items():
        click.echo(f"{name:<22}{got.get(name, 0):>10,}  {seg.strategy}")


@main.command()
@click.option("--follow", is_flag=True, help="Keep printing new changes until Ctrl-C.")
def changes(follow: bool) -> None:
    """Print the segment changes on the segment-changes topic, one JSON object per line
    (partition by partition, in offset order), from the beginning to its end as of now; with
    --follow, then every new one as it arrives."""
    from aiokafka import AIOKafkaConsumer

    from stream.kafka_io import at_end, client_options, from_beginning, started

    settings = _settings(resolve=False)
    topic = settings.segment_changes_topic

    async def show() -> None:
        consumer = AIOKafkaConsumer(**client_options(settings), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await started(consumer)
        try:
            tps = await from_beginning(consumer, topic)
            if not tps:
                raise click.ClickException(f"no topic {topic!r} on {settings.kafka_url}")
            while follow or not await at_end(consumer, tps):
                batch = await consumer.getmany(timeout_ms=500)
                lines = [r.value.decode("utf-8", "replace")
                         for tp in sorted(batch, key=lambda tp: tp.partition)
                         for r in batch[tp] if r.value is not None]
                try:
                    for line in lines:
                        click.echo(line)
                    sys.stdout.flush()
                except BrokenPipeError:  # `rfm-stream changes | head`: the reader is done
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                    return
        finally:
            await consumer.stop()

    try:
        _run(show())
    except KeyboardInterrupt:
        if not follow:  # cut short: a script must not take it for the whole topic
            raise click.ClickException("interrupted") from None
    except _kafka_errors() as exc:
        raise click.ClickException(f"Kafka unreachable at {settings.kafka_url}: "
                                   f"{type(exc).__name__}: {exc}") from exc


@main.command()
@click.option("--out", default="customers.csv", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help=".csv or .parquet")
@click.option("--as-of", default=None, metavar="ISO-TIME",
              help="Score at this time [default: the watermark].")
def export(out: Path, as_of: str | None) -> None:
    """Export every customer scored at one as-of time (recency, scores, segment, cluster).

    A customer whose stored value cannot be decoded (written by hand or by a bug) is left out
    of the file and named on stderr, and the command then exits with 1.
    """
    from stream.export import export_customers
    from stream.timeline import iso

    settings = _settings()
    unreadable: list[tuple[str, str]] = []
    try:
        n, t = _run(export_customers(settings, out, _epoch_ms(as_of), unreadable))
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{n:,} customers scored at {iso(t)} "
               f"-> {out}")
    if unreadable:
        click.echo(f"Error: {len(unreadable):,} stored customer value(s) could not be decoded "
                   "and are not in the file:", err=True)
        for customer_id, reason in unreadable[:20]:
            click.echo(f"  {customer_id!r}: {reason}", err=True)
        if len(unreadable) > 20:
            click.echo(f"  ... and {len(unreadable) - 20:,} more", err=True)
        sys.exit(1)


@main.command()
@click.argument("customer_id")
def forget(customer_id: str) -> None:
    """Erase one customer's state everywhere (a data-protection request).

    Removes the state, population entries, due time, segment count and unpublished outbox
    entries in Redis, and queues a tombstone for the customer on the compacted
    customer-segments topic (published by the worker that owns the partition, after anything
    it has in flight). Past events on the purchases and segment-changes topics are kept until
    their retention ends.
    """
    settings = _settings()  # first: bad settings are a clean error
    from stream.admin import forget_customer

    found = _run(forget_customer(settings, customer_id))
    click.echo(f"{customer_id}: {'erased' if found else 'not found (nothing stored)'}; "
               "a tombstone is queued for the customer-segments topic")
    if not found:
        sys.exit(1)


@main.command("drop-namespace")
@click.argument("namespace")
def drop_namespace(namespace: str) -> None:
    """Delete every key of NAMESPACE from Redis (a namespace no longer used).

    For the namespace a `replay --switch` moved the workers away from (once they run on the
    new one), or a replay's kept for comparison: customers erased with `forget` stay in those
    until they are dropped. Refuses the namespace RFM_NAMESPACE resolves to and the target
    of any alias. Stop whatever still writes NAMESPACE first.
    """
    settings = _settings(resolve=False)
    from redis.exceptions import RedisError

    from stream.admin import drop_namespace as drop

    try:
        deleted = _run(drop(settings, namespace))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    except RedisError as exc:
        raise click.ClickException(f"Redis at the configured RFM_REDIS_URL: {exc}") from exc
    click.echo(f"{namespace}: {deleted} keys deleted" if deleted
               else f"{namespace}: nothing stored")


if __name__ == "__main__":  # pragma: no cover
    main()
