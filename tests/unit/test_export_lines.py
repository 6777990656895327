"""``segment_changes.jsonl`` holds the topic's values as ``rfm-stream changes`` prints them."""

from __future__ import annotations

from stream.export import write_jsonl


def test_values_are_written_as_they_are_and_a_multi_line_one_compact(tmp_path):
    path = tmp_path / "out" / "changes.jsonl"
    values = [b'{"z":1,"a":"\xc3\xa9"}', b'{\n  "b": 2,\n  "a": [1, 2]\n}']
    assert write_jsonl(values, path) == 2
    assert path.read_bytes() == b'{"z":1,"a":"\xc3\xa9"}\n{"b":2,"a":[1,2]}\n'
