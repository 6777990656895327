"""The published JSON Schemas (docs/schemas) are the ones the event models generate."""

from __future__ import annotations

from pathlib import Path

from stream.events import write_schemas

DOCS = Path(__file__).parent.parent.parent / "docs" / "schemas"


def test_published_schemas_are_up_to_date(tmp_path):
    written = write_schemas(tmp_path)
    assert written
    for path in written:
        assert (DOCS / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: run `make schemas`")
