"""R, F and M scores 1-5: population quintiles, or fixed business thresholds.

Pure functions; the as-of time is passed in.

Quintile rule (README, "RFM definitions"): with N scored customers and ``worse`` the number of
customers with a strictly worse value (larger recency, smaller frequency or monetary),

    score = 1 + floor(5 * worse / N)

so equal values always get equal scores (ties are normal: most customers have one order), and
the best-valued customers get 5. It is the percentile-rank form of quintile scoring (Hughes,
"Strategic Database Marketing", RFM quintiles), made tie-safe. Below a minimum population the
fixed thresholds apply.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from state.rfm import MS_PER_DAY, recency_days


def quintile_score(worse: int, population: int) -> int:
    """Score 1-5 from the number of strictly worse customers among ``population``.

    Raises
    ------
    ValueError
        When ``population`` < 1 or ``worse`` is not in ``[0, population)``.

    Examples
    --------
    >>> [quintile_score(w, 10) for w in range(10)]
    [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    >>> quintile_score(0, 1)  # a lone customer has nobody worse
    1
    """
    if population < 1 or not 0 <= worse < population:
        raise ValueError(f"worse={worse} must be in [0, population={population})")
    return 1 + (5 * worse) // population


@dataclass(frozen=True, slots=True)
class FixedThresholds:
    """Business thresholds used below the minimum population (or always, if configured).

    Parameters
    ----------
    recency_days
        Ascending upper bounds (days) for R = 5, 4, 3, 2: recency <= bounds[0] gives 5; above
        bounds[3] gives 1.
    frequency
        Ascending lower bounds for F = 2, 3, 4, 5 (orders).
    monetary_minor
        Ascending lower bounds for M = 2, 3, 4, 5, minor currency units (cents).

    Examples
    --------
    >>> t = FixedThresholds((30, 90, 180, 365), (2, 3, 5, 8), (5000, 10000, 25000, 50000))
    >>> [t.r(d) for d in (0, 30, 31, 90, 91, 365, 366)]
    [5, 5, 4, 4, 3, 2, 1]
    >>> [t.f(x) for x in (1, 2, 4, 5, 8, 100)], [t.m(x) for x in (0, 4999, 5000, 50000)]
    ([1, 2, 3, 4, 5, 5], [1, 1, 2, 5])
    """

    recency_days: tuple[int, int, int, int]
    frequency: tuple[int, int, int, int]
    monetary_minor: tuple[int, int, int, int]

    def r(self, days: int) -> int:
        return 5 - bisect.bisect_left(self.recency_days, days)

    def f(self, frequency: int) -> int:
        return 1 + bisect.bisect_right(self.frequency, frequency)

    def m(self, monetary_minor: int) -> int:
        return 1 + bisect.bisect_right(self.monetary_minor, monetary_minor)


def quintile_ranks(population: int) -> tuple[int, int, int, int]:
    """The ranks ``k_j = ceil(j * N / 5)``, j = 1..4, whose order statistics bound the quintiles.

    A value has a score above ``j`` exactly when at least ``k_j`` customers are strictly worse.

    >>> quintile_ranks(10), quintile_ranks(7)
    ((2, 4, 6, 8), (2, 3, 5, 6))
    """
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    k = tuple(-(-j * population // 5) for j in range(1, 5))
    return (k[0], k[1], k[2], k[3])


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Score boundaries of one version: the pure, versioned form of either scoring mode.

    ``R = 1 + #{j : recency_days < r_below[j]}``, ``F = 1 + #{j : frequency > f_above[j]}``,
    ``M = 1 + #{j : monetary_minor > m_above[j]}``.

    For quintiles of a population of N customers (:meth:`from_population`), ``f_above[j]`` is
    the ``k_j``-th smallest frequency and ``r_below[j]`` the ``k_j``-th largest recency
    (``k_j`` from :func:`quintile_ranks`), which makes the scores equal to
    ``1 + floor(5 * worse / N)`` against that population (proof: ``floor(5c/N) >= j`` iff
    ``c >= ceil(jN/5)``, and at least ``k`` values are below ``v`` iff the ``k``-th smallest is).

    Fixed thresholds score recency at the as-of time: an inactive customer's R falls as days
    pass. Quintile thresholds are *anchored* at the event time they were computed at
    (``anchor_ms``): recency is a rank, so it is scored as days before the anchor, and time
    passing alone changes no one's R (everyone ages alike); R moves when a refresh finds that
    the population moved on (README "Scoring").

    Parameters
    ----------
    version
        ``fixed`` or ``q<N>@<as-of time>``; carried by segment-change events.
    r_below, f_above, m_above
        Four boundaries each (days; orders; minor currency units).
    population
        N the boundaries were computed from (0 for fixed thresholds).
    anchor_ms
        Event time (epoch ms) recency is measured at for scoring; None: the as-of time.

    Examples
    --------
    >>> t = Thresholds.from_population([0, 0, 30, 400, 10], [1, 1, 1, 2, 3], [5, 5, 7, 9, 9])
    >>> [t.score(d, f, m) for d, f, m in [(0, 1, 5), (30, 1, 7), (400, 2, 9), (10, 3, 9)]]
    [(4, 1, 1), (2, 1, 3), (1, 4, 4), (3, 5, 4)]
    """

    version: str
    r_below: tuple[int, int, int, int]
    f_above: tuple[int, int, int, int]
    m_above: tuple[int, int, int, int]
    population: int = 0
    anchor_ms: int | None = None

    def scoring_days(self, last_purchase_ms: int, as_of_ms: int) -> int:
        """The recency (days) that :meth:`score` takes: at the anchor, or at ``as_of_ms``."""
        return recency_days(last_purchase_ms,
                            as_of_ms if self.anchor_ms is None else self.anchor_ms)

    def next_recency_change_ms(self, last_purchase_ms: int, as_of_ms: int) -> int | None:
        """The first event time after ``as_of_ms`` at which R falls with no new event (fixed
        thresholds: ``last + b`` days for the next bound ``b``); None if never (anchored
        thresholds, or R is already 1).

        >>> t = Thresholds.fixed(FixedThresholds((30, 90, 180, 365), (2, 3, 5, 8), (1, 2, 3, 4)))
        >>> t.next_recency_change_ms(0, 0) // 86_400_000, t.next_recency_change_ms(0, 400 * 86_400_000)
        (31, None)
        """
        if self.anchor_ms is not None:
            return None
        times = [last_purchase_ms + b * MS_PER_DAY for b in self.r_below]
        return min((t for t in times if t > as_of_ms), default=None)

    def score(self, recency_days: int, frequency: int, monetary_minor: int
              ) -> tuple[int, int, int]:
        """(R, F, M) scores 1-5 of one customer (recency from :meth:`scoring_days`)."""
        r, f, m = self.r_below, self.f_above, self.m_above  # unrolled: the hot path
        return (1 + (recency_days < r[0]) + (recency_days < r[1]) + (recency_days < r[2])
                + (recency_days < r[3]),
                1 + (frequency > f[0]) + (frequency > f[1]) + (frequency > f[2])
                + (frequency > f[3]),
                1 + (monetary_minor > m[0]) + (monetary_minor > m[1]) + (monetary_minor > m[2])
                + (monetary_minor > m[3]))

    def score_many(self, last_purchase_ms: npt.ArrayLike, as_of_ms: int,
                   frequency: npt.ArrayLike, monetary_minor: npt.ArrayLike
                   ) -> npt.NDArray[np.int64]:
        """:meth:`score` of N customers at once: arrays of shape (N,) in (last purchase ms,
        frequency, monetary minor); returns an int64 array of shape (N, 3) of (R, F, M)."""
        at = as_of_ms if self.anchor_ms is None else self.anchor_ms
        days = np.maximum(0, (at - np.asarray(last_purchase_ms, dtype=np.int64)) // MS_PER_DAY)
        f = np.asarray(frequency, dtype=np.int64)
        m = np.asarray(monetary_minor, dtype=np.int64)
        out = np.ones((days.shape[0], 3), dtype=np.int64)
        for j in range(4):
            out[:, 0] += days < self.r_below[j]
            out[:, 1] += f > self.f_above[j]
            out[:, 2] += m > self.m_above[j]
        return out

    def moved_ranges(self, new: Thresholds) -> list[tuple[str, float, float]]:
        """The closed ranges ``(kind, low, high)`` of population values (kind ``last``: last
        purchase, epoch ms; ``freq``; ``mon``: minor units) that hold exactly the customers
        whose R, F or M score differs between these anchored thresholds and ``new`` ones.

        A bound ``b >= 1`` of R holds for a customer exactly when its last purchase is after
        ``anchor - b`` days (recency is floored and never negative); a bound ``b <= 0`` holds
        for nobody. So a score moves on bound j only for last purchases between the old and
        the new cut, or after the one cut that holds when the other bound is 0. F and M move
        only for values in ``(min(old, new), max(old, new)]``. Either side unanchored: every
        customer (``last`` over all times).

        Examples
        --------
        >>> day = 86_400_000
        >>> old = Thresholds("q", (30, 20, 10, 1), (1, 1, 2, 4), (10, 20, 30, 40), 9, 100 * day)
        >>> new = Thresholds("q", (31, 20, 10, 0), (1, 2, 2, 4), (10, 20, 30, 40), 9, 100 * day)
        >>> r0, r3, f1 = old.moved_ranges(new)  # R bounds 30 -> 31 and 1 -> 0 days; F 1 -> 2
        >>> r0 == ("last", 69 * day + 1, 70 * day), r3 == ("last", 99 * day + 1, float("inf"))
        (True, True)
        >>> f1  # F moves only for a frequency of 2
        ('freq', 2, 2)
        """
        if self.anchor_ms is None or new.anchor_ms is None:
            return [("last", float("-inf"), float("inf"))]
        out: list[tuple[str, float, float]] = []
        for b_old, b_new in zip(self.r_below, new.r_below, strict=True):
            cuts = [anchor - b * MS_PER_DAY for anchor, b in ((self.anchor_ms, b_old),
                                                              (new.anchor_ms, b_new)) if b >= 1]
            if len(cuts) == 2 and cuts[0] != cuts[1]:  # last purchase in (low cut, high cut]
                out.append(("last", min(cuts) + 1, max(cuts)))
            elif len(cuts) == 1:  # after the one cut that holds
                out.append(("last", cuts[0] + 1, float("inf")))
        for kind, a, b in (("freq", self.f_above, new.f_above), ("mon", self.m_above, new.m_above)):
            out += [(kind, min(x, y) + 1, max(x, y)) for x, y in zip(a, b, strict=True) if x != y]
        return out

    @classmethod
    def fixed(cls, t: FixedThresholds) -> Thresholds:
        """The fixed business thresholds in this form."""
        r = tuple(b + 1 for b in t.recency_days)
        f = tuple(b - 1 for b in t.frequency)
        m = tuple(b - 1 for b in t.monetary_minor)
        return cls("fixed", (r[0], r[1], r[2], r[3]), (f[0], f[1], f[2], f[3]),
                   (m[0], m[1], m[2], m[3]))

    @classmethod
    def from_order_statistics(cls, population: int, r_kth_largest: Sequence[int],
                              f_kth_smallest: Sequence[int], m_kth_smallest: Sequence[int],
                              version: str, anchor_ms: int | None = None) -> Thresholds:
        """Quintile thresholds from the order statistics at :func:`quintile_ranks`."""
        def four(x: Sequence[int]) -> tuple[int, int, int, int]:
            if len(x) != 4:
                raise ValueError(f"need 4 order statistics, got {len(x)}")
            return (int(x[0]), int(x[1]), int(x[2]), int(x[3]))
        return cls(version, four(r_kth_largest), four(f_kth_smallest), four(m_kth_smallest),
                   population, anchor_ms)

    @classmethod
    def from_population(cls, recency_days: npt.ArrayLike, frequency: npt.ArrayLike,
                        monetary_minor: npt.ArrayLike, version: str = "q",
                        anchor_ms: int | None = None) -> Thresholds:
        """Quintile thresholds of a whole population given as arrays of shape (N,)
        (recency in days at ``anchor_ms``)."""
        r, f, m = (np.sort(np.asarray(a)) for a in (recency_days, frequency, monetary_minor))
        k = np.array(quintile_ranks(len(r))) - 1
        return cls.from_order_statistics(len(r), r[::-1][k].tolist(), f[k].tolist(),
                                         m[k].tolist(), version, anchor_ms)

    def to_dict(self) -> dict[str, object]:
        return {"version": self.version, "r_below": list(self.r_below),
                "f_above": list(self.f_above), "m_above": list(self.m_above),
                "population": self.population, "anchor_ms": self.anchor_ms}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Thresholds:
        anchor = d.get("anchor_ms")
        return cls.from_order_statistics(int(d["population"]), d["r_below"],  # type: ignore[arg-type]
                                         d["f_above"], d["m_above"], str(d["version"]),  # type: ignore[arg-type]
                                         None if anchor is None else int(anchor))  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class ScoringConfig:
    """How thresholds are made.

    Parameters
    ----------
    mode
        ``quintiles`` (population quintiles, fixed thresholds below ``min_population``) or
        ``fixed`` (always the fixed thresholds).
    fixed
        The fixed business thresholds.
    min_population
        Customers needed before quintiles are used.
    refresh_every
        Offsets per partition between threshold refreshes (>= 1).
    """

    mode: str
    fixed: FixedThresholds
    min_population: int = 100
    refresh_every: int = 1000


def population_scores(
    values: npt.ArrayLike, higher_is_better: bool
) -> npt.NDArray[np.int64]:
    """Quintile scores of a whole population at once (the batch twin of :func:`quintile_score`).

    Parameters
    ----------
    values
        Shape (N,): recency in days (``higher_is_better=False``), frequency or monetary.

    Returns
    -------
    ndarray of int64, shape (N,)
        Scores 1-5.

    Examples
    --------
    >>> population_scores([1, 1, 1, 2, 3], higher_is_better=True).tolist()
    [1, 1, 1, 4, 5]
    >>> population_scores([10, 0, 10, 400, 5], higher_is_better=False).tolist()
    [2, 5, 2, 1, 4]
    """
    v = np.asarray(values)
    n = v.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    s = np.sort(v)
    if higher_is_better:
        worse = np.searchsorted(s, v, side="left")
    else:
        worse = n - np.searchsorted(s, v, side="right")
    return (1 + (5 * worse) // n).astype(np.int64)
