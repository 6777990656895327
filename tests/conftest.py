"""Shared fixtures: the real local stack (broker + redis-server), started once per session by
the same launcher as ``make demo``, and per-test settings with unique names so tests never
share topics, consumer groups or state namespaces."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream import localstack
from stream.demo import local_settings
from stream.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracles.py

_counter = itertools.count()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.LocalStack]:
    s = localstack.start(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def unique() -> str:
    """A name unique within this test session (and across parallel sessions)."""
    return f"t{os.getpid()}x{next(_counter)}"


@pytest.fixture
def settings(stack: localstack.LocalStack, unique: str) -> Settings:
    """Settings of a worker on the local stack with its own topics, group and namespace."""
    return local_settings(
        stack, namespace=unique, app_id=f"rfm-{unique}", purchases_topic=f"{unique}-purchases",
        dead_letter_topic=f"{unique}-dlq", segment_changes_topic=f"{unique}-changes",
        customer_segments_topic=f"{unique}-segments")
