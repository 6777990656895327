"""The Kafka security settings reach every client: the worker's faust app and the aiokafka
clients outside it (``load``, ``replay``, the demo, the worker's re-read of a gap), which
used to connect in PLAINTEXT whatever ``RFM_KAFKA_SECURITY_PROTOCOL`` said."""

from __future__ import annotations

import ssl

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from stream.faustconf import broker_credentials
from stream.kafka_io import client_options
from stream.settings import Settings


def secured(protocol: str, **override) -> Settings:
    return Settings(**{"kafka_url": "kafka://k1:9093;k2:9093",
                       "kafka_security_protocol": protocol,
                       "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": "rfm",
                       "kafka_sasl_password": SecretStr("s3cret"), **override})


def test_sasl_ssl_gives_the_aiokafka_clients_the_mechanism_credentials_and_tls():
    options = client_options(secured("SASL_SSL"))
    context = options.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert options == {"bootstrap_servers": "k1:9093,k2:9093", "security_protocol": "SASL_SSL",
                       "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "rfm",
                       "sasl_plain_password": "s3cret"}


@pytest.mark.parametrize("protocol", ["SSL", "SASL_PLAINTEXT"])
def test_tls_only_where_the_protocol_has_it_and_sasl_only_where_it_has_sasl(protocol):
    options = client_options(secured(protocol))
    assert ("ssl_context" in options) == (protocol == "SSL")
    assert ("sasl_mechanism" in options) == (protocol == "SASL_PLAINTEXT")
    assert options["security_protocol"] == protocol


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
async def test_aiokafka_accepts_the_options_and_faust_gets_the_same_security(protocol):
    settings = secured(protocol)
    options = client_options(settings)
    consumer, producer = AIOKafkaConsumer(**options), AIOKafkaProducer(**options)
    admin = AIOKafkaAdminClient(**options)  # arguments validated here; nothing connects
    try:
        for client in (consumer._client, producer.client, admin._client):
            assert client._security_protocol == protocol
            assert client._sasl_mechanism == ("SCRAM-SHA-512" if "SASL" in protocol
                                              else "PLAIN")  # aiokafka's default
            assert (client._ssl_context is not None) == protocol.endswith("SSL")
    finally:
        await consumer.stop()
        await producer.stop()
        await admin.close()
    credentials = broker_credentials(settings)
    if protocol == "PLAINTEXT":
        assert credentials is None
    elif protocol == "SSL":
        assert isinstance(credentials, faust.SSLCredentials)
    else:
        assert isinstance(credentials, faust.SASLCredentials)
        assert (credentials.username, credentials.password, credentials.mechanism.value) == (
            "rfm", "s3cret", "SCRAM-SHA-512")


@pytest.mark.parametrize("missing", ["kafka_sasl_username", "kafka_sasl_password"])
def test_sasl_without_credentials_is_refused_with_the_settings(missing):
    with pytest.raises(ValueError, match="SASL_SSL needs kafka_sasl_username and kafka_sasl_"):
        secured("SASL_SSL", **{missing: None})
    assert secured("SSL", **{missing: None}).kafka_security_protocol == "SSL"  # no SASL


def test_a_ca_file_that_cannot_be_used_is_refused_with_its_path(tmp_path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path, not_pem):
        with pytest.raises(ValueError, match=f"kafka_ssl_cafile '{path}' cannot be used"):
            secured("SASL_SSL", kafka_ssl_cafile=str(path))
    # not used without TLS: not checked
    assert secured("SASL_PLAINTEXT", kafka_ssl_cafile=str(not_pem)).kafka_ssl_cafile
