"""The worker's HTTP endpoints on faust's web server: ``/metrics`` (Prometheus), ``/health``,
``/ready``, ``/segments``, ``/clusters``, ``/customers/{id}`` (README "Metrics and HTTP
endpoints"). Every endpoint but ``/health`` requires ``Authorization: Bearer <token>`` when
``RFM_HTTP_TOKEN`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from stream.fastpath import BatchTransport
from stream.relay import KILL_SILENT_S as RELAY_KILL_SILENT_S
from stream.relay import SILENT_S as RELAY_SILENT_S
from stream.services import Services, customer_json

log = logging.getLogger("rfm_stream")


def add_views(app: faust.App, services: Services,
              consumer_lag: Callable[[], Awaitable[dict[int, int]]],
              owned_partitions: Callable[[], set[int]]) -> None:
    """Register the endpoints on ``app``. ``consumer_lag()``: records behind the end of each
    owned partition whose end is known; ``owned_partitions()``: the partitions assigned and
    not since revoked."""
    settings = services.settings

    def authorized(request: Any) -> bool:
        """Bearer token check (RFM_HTTP_TOKEN) for every endpoint but /health."""
        token = settings.http_token
        if token is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode())

    def denied(web: Any) -> Any:
        return web.json({"error": "unauthorized: send Authorization: Bearer <RFM_HTTP_TOKEN>"},
                        status=401)

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        if not authorized(request):
            return denied(web)
        m = services.metrics
        try:  # gauges read from Redis; while it is unreachable the rest is still served
            parts = range(settings.partitions)
            counts = await asyncio.wait_for(services.store.segment_counts(parts), 2)
            for name in services.processor.table.segments:
                m.customers.labels(name).set(counts.get(name, 0))
            m.outbox_depth.set(await asyncio.wait_for(services.store.outbox_depth(parts), 2))
            lags = await consumer_lag()
            for p in range(settings.partitions):  # a series only where the lag is known
                if p in lags:
                    m.consumer_lag.labels(str(p)).set(lags[p])
                else:
                    with contextlib.suppress(KeyError):  # no series yet
                        m.consumer_lag.remove(str(p))
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("/metrics: Redis gauges not refreshed (%r)", exc)
        alignment = cast(BatchTransport, app.transport).alignments.get(settings.purchases_topic)
        for p in range(settings.partitions):
            m.held_back.labels(str(p)).set(alignment.held_back(p) if alignment else 0)
        model = services.processor.model
        if model is not None:
            for prof in model.profiles:
                m.cluster_customers.labels(str(prof["cluster"])).set(prof.get("size") or 0)
        return web.bytes(generate_latest(m.registry),
                         content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health")
    async def health_view(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/ready")
    async def ready_view(web: Any, request: Any) -> Any:
        if not authorized(request):
            return denied(web)
        problems = []
        if services.redis_failing:
            problems.append("redis unavailable (retrying)")
        else:
            try:
                await asyncio.wait_for(services.store.client.ping(), 2)
            except Exception as exc:
                problems.append(f"redis ping failed: {exc!r}")
        if services.outbox_error:
            problems.append(f"outbox not published (retrying): {services.outbox_error}")
        relay = services.publisher
        if relay is not None and relay.silent_s() > RELAY_SILENT_S:
            problems.append(f"outbox relay silent for {relay.silent_s():.0f} s (stopped or "
                            f"hung; replaced at {RELAY_KILL_SILENT_S:.0f} s)")
        if not services.started:
            problems.append("consumer not started")
        else:
            try:
                waiting = sum((await consumer_lag()).values())
            except (TimeoutError, RedisError, OSError):
                waiting = 0  # Redis trouble is reported above
            idle = time.monotonic() - services.last_batch
            if waiting and idle > settings.ready_stall_s:
                problems.append(f"{waiting} records wait but no batch was applied for "
                                f"{idle:.0f} s (stuck?)")
        body = {"ready": not problems, "problems": problems,
                "partitions": sorted(owned_partitions()) if services.started else []}
        return web.json(body, status=200 if not problems else 503)

    @app.page("/segments")
    async def segments_view(web: Any, request: Any) -> Any:
        if not authorized(request):
            return denied(web)
        counts = await services.store.segment_counts(range(settings.partitions))
        table = services.processor.table
        return web.json({"rules_version": table.version, "segments": [
            {"segment": s.name, "customers": counts.get(s.name, 0), "strategy": s.strategy,
             "description": s.description} for s in table.segments.values()]})

    @app.page("/clusters")
    async def clusters_view(web: Any, request: Any) -> Any:
        if not authorized(request):
            return denied(web)
        text = await services.store.load_model()
        if text is None:
            return web.json({"model_version": None, "clusters": []})
        snap = json.loads(text)
        return web.json({"model_version": snap.get("version"), "as_of_ms": snap.get("as_of_ms"),
                         "population": snap.get("population"),
                         "clusters": snap.get("profiles", [])})

    @app.page("/customers/{customer_id:[^/]+}")
    async def customer_view(web: Any, request: Any, customer_id: str) -> Any:
        if not authorized(request):
            return denied(web)
        body, status = await customer_json(services, customer_id)
        return web.json(body, status=status)
