"""Invalid settings are named as the user set them: the environment variable (or the key of
``RFM_CONFIG_FILE``), the value given unless it is a secret, and the reason, one line each
(pydantic's own text took 3-4 lines per error, with field names and a URL)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from stream.settings import Settings, explain


def error_text(monkeypatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    return explain(caught.value)


def test_each_invalid_variable_gets_one_line_with_its_name_and_value(monkeypatch):
    text = error_text(monkeypatch, RFM_PARTITIONS="abc", RFM_SCORING_MODE="foo")
    lines = text.split("\n  ")
    assert len(lines) == 2
    assert lines[0].startswith("RFM_PARTITIONS = 'abc': ") and "integer" in lines[0]
    assert lines[1].startswith("RFM_SCORING_MODE = 'foo': ") and "'quintiles'" in lines[1]
    assert "pydantic.dev" not in text


def test_a_config_file_value_is_named_by_its_key_and_file(monkeypatch, tmp_path):
    config = tmp_path / "rfm.toml"
    config.write_text('batch_max = 0\n', encoding="utf-8")
    text = error_text(monkeypatch, RFM_CONFIG_FILE=str(config))
    assert text.startswith(f"batch_max = 0 (in {config}): ") and "greater than" in text


def test_secrets_are_not_shown(monkeypatch, tmp_path):
    config = tmp_path / "rfm.toml"  # a number where text is expected
    config.write_text("kafka_sasl_password = 73917\n", encoding="utf-8")
    text = error_text(monkeypatch, RFM_CONFIG_FILE=str(config))
    assert text.startswith(f"kafka_sasl_password (in {config}): ")
    assert "73917" not in text


@pytest.mark.parametrize("url, says", [("foo://h:6379/0", "must start with redis://"),
                                       ("redis://:pw@h:abc/0", "numeric port")])
def test_a_malformed_redis_url_is_a_setting_error_that_shows_no_part_of_it(monkeypatch, url,
                                                                            says):
    """A breaker's case: every command failed with redis-py's traceback."""
    text = error_text(monkeypatch, RFM_REDIS_URL=url)
    assert says in text and "pw" not in text and "abc" not in text


@pytest.mark.parametrize("name", ["live ", "a b", "tab\there", "new\nline", "", "a:b", "{p0}",
                                  "l\\ive", "r2\\"])
def test_a_namespace_that_the_key_layout_cannot_hold_is_refused_by_name(monkeypatch, name):
    """A namespace with whitespace or a control character was accepted (only ``{}:*?[]`` were
    refused): set by hand as an alias (``"live "``), it pointed every command at an empty
    namespace. A backslash, the key patterns' escape, made ``l\\ive`` match the keys of
    ``live`` (a breaker dropped the workers' namespace with ``drop-namespace 'l\\ive'``)."""
    text = error_text(monkeypatch, RFM_NAMESPACE=name)
    assert text.startswith(f"RFM_NAMESPACE = {name!r}: ") and "invalid namespace" in text


@pytest.mark.parametrize("value", ["inf", "-1", "nan"])
def test_an_alignment_skew_must_be_a_finite_number_of_seconds(monkeypatch, value):
    """``RFM_LIVE_MAX_SKEW_S=inf`` was accepted and meant "no alignment" in a roundabout way
    (a breaker's finding); 0 is the documented way."""
    text = error_text(monkeypatch, RFM_LIVE_MAX_SKEW_S=value)
    assert text.startswith(f"RFM_LIVE_MAX_SKEW_S = {value!r}: ")


@pytest.mark.parametrize("command", ["customer", "forget"])
def test_commands_that_import_the_worker_app_name_an_invalid_setting_without_a_traceback(
        command):
    """A fresh user's finding: ``customer`` and ``forget`` imported the worker's app, which
    reads the settings at import, before the command checked them: a pydantic traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFM_")}
    env["RFM_NAMESPACE"] = "live "
    out = subprocess.run([sys.executable, "-m", "stream", command, "c1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "RFM_NAMESPACE = 'live ': " in out.stderr + out.stdout


@pytest.mark.parametrize("port", ["0", "65536"])
def test_a_web_port_outside_1_to_65535_is_refused(monkeypatch, port):
    """README "Scaling out": each worker needs a port of its own, from 1 to 65535. Port 0
    (any free one) was accepted, and nothing would say which port the worker took."""
    text = error_text(monkeypatch, RFM_WEB_PORT=port)
    assert text.startswith(f"RFM_WEB_PORT = '{port}': "), text
