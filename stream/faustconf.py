"""The worker's faust settings, in a module with no side effects: the worker's app
(``stream/app.py``) and the benchmarks' empty agent (``bench/empty_agent.py``) are built from
the same ones, so the two are measured alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust

from stream.kafka_io import ssl_context
from stream.settings import Settings


def broker_credentials(settings: Settings) -> Any:
    """faust credentials for ``RFM_KAFKA_SECURITY_PROTOCOL`` (None for PLAINTEXT)."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings) if protocol.endswith("SSL") else None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    password = settings.kafka_sasl_password
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=password.get_secret_value() if password else None,
        mechanism=settings.kafka_sasl_mechanism, ssl_context=context)


def faust_options(settings: Settings) -> dict[str, Any]:
    """The faust settings of the worker's app (also those of the benchmarks' empty agent, so
    the two are measured alike)."""
    return dict(
        broker=settings.kafka_url,
        broker_credentials=broker_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        web_bind=settings.web_bind,
        web_host=settings.web_bind,
        web_port=settings.web_port,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        topic_partitions=settings.partitions,
        broker_max_poll_records=settings.batch_max,
        stream_processing_timeout=settings.stream_processing_timeout_s,
        producer_linger=0.005,
        producer_max_batch_size=1_048_576,
        producer_acks=-1,
        datadir=str(Path(settings.data_dir) / settings.app_id),
    )
