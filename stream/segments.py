"""Named RFM segments: a rule table (TOML data) mapping every (R, F, M) score triple to one segment.

The default table (``stream/segments.toml``) is the common R x F grid used in RFM practice
(Champions, Loyal Customers, ..., Hibernating); each segment carries a recommended strategy,
the per-group strategy customer-portfolio management asks for.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


class SegmentTableError(ValueError):
    """The rule table is malformed, has a gap, or has an overlap."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A named segment and its recommended strategy."""

    name: str
    strategy: str
    description: str


@dataclass(frozen=True)
class SegmentTable:
    """A complete map from (r, f, m) scores to segments.

    Build with :meth:`load` / :meth:`from_dict`, which check that each of the 125 score
    triples matches exactly one rule.

    Examples
    --------
    >>> t = SegmentTable.load()
    >>> t.lookup(5, 5, 1).name, t.lookup(1, 1, 5).name, t.lookup(2, 3, 3).name
    ('Champions', 'Hibernating', 'At Risk')
    """

    version: str
    segments: dict[str, Segment]
    _cells: dict[tuple[int, int, int], str]

    def lookup(self, r: int, f: int, m: int) -> Segment:
        """The segment of a score triple (each 1-5).

        Raises
        ------
        KeyError
            When a score is outside 1-5.
        """
        return self._by_cell[(r, f, m)]

    @functools.cached_property
    def rules_digest(self) -> str:
        """16 hex characters of a SHA-256 over which segment each of the 125 score triples
        maps to: what decides the customers' stored segments (a change of strategy texts or
        of ``version`` alone leaves it as it is).

        >>> t = SegmentTable.load()
        >>> t.rules_digest == SegmentTable.load().rules_digest, len(t.rules_digest)
        (True, 16)
        """
        text = "\n".join(f"{r}{f}{m}={self._cells[(r, f, m)]}"
                         for r, f, m in itertools.product(range(1, 6), repeat=3))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    @functools.cached_property
    def _by_cell(self) -> dict[tuple[int, int, int], Segment]:
        return {cell: self.segments[name] for cell, name in self._cells.items()}

    def lookup_many(self, scores: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """:meth:`lookup` of N score triples at once: ``scores`` of shape (N, 3), each 1-5;
        returns shape (N,) positions of the segments in ``list(self.segments)``."""
        s = np.asarray(scores, dtype=np.int64).reshape(-1, 3)
        return self._grid[s[:, 0], s[:, 1], s[:, 2]]

    @functools.cached_property
    def _grid(self) -> npt.NDArray[np.int64]:
        names = list(self.segments)
        grid = np.full((6, 6, 6), -1, dtype=np.int64)
        for (r, f, m), name in self._cells.items():
            grid[r, f, m] = names.index(name)
        return grid

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentTable:
        """Build and check a table from its parsed TOML form.

        Raises
        ------
        SegmentTableError
            On a missing field, a bad range, a duplicate name, a gap or an overlap.
        """
        version = data.get("version")
        if not isinstance(version, str) or not version:
            raise SegmentTableError("the table needs a non-empty string 'version'")
        segments: dict[str, Segment] = {}
        cells: dict[tuple[int, int, int], str] = {}
        for entry in data.get("segment", []):
            try:
                seg = Segment(entry["name"], entry["strategy"], entry.get("description", ""))
                rules = entry["rules"]
            except (KeyError, TypeError) as exc:
                raise SegmentTableError(f"segment entry {entry!r} lacks {exc}") from exc
            if seg.name in segments:
                raise SegmentTableError(f"segment {seg.name!r} is defined twice")
            segments[seg.name] = seg
            for rule in rules:
                ranges = [_range(rule, dim, seg.name) for dim in "rfm"]
                for cell in itertools.product(*ranges):
                    if cell in cells:
                        raise SegmentTableError(
                            f"scores {cell} match both {cells[cell]!r} and {seg.name!r}")
                    cells[cell] = seg.name
        gaps = [c for c in itertools.product(range(1, 6), repeat=3) if c not in cells]
        if gaps:
            raise SegmentTableError(f"{len(gaps)} score triples match no segment, e.g. {gaps[0]}")
        return cls(version, segments, cells)

    @classmethod
    def load(cls, path: str | Path | None = None) -> SegmentTable:
        """Load a TOML table; None loads the default shipped with the package."""
        if path is None:
            text = resources.files("stream").joinpath("segments.toml").read_text("utf-8")
        else:
            text = Path(path).read_text("utf-8")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SegmentTableError(f"segment table is not valid TOML: {exc}") from exc
        return cls.from_dict(data)


def _range(rule: dict[str, Any], dim: str, name: str) -> range:
    lo, hi = rule.get(dim, [1, 5])
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 5):
        raise SegmentTableError(f"segment {name!r}: {dim} range {[lo, hi]} is not within 1..5")
    return range(lo, hi + 1)
