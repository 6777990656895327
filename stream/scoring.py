"""R, F and M scores 1-5: population quintiles, or fixed business thresholds.

Pure functions; the as-of time is passed in.

Quintile rule (DESIGN.md, "RFM semantics"): with N scored customers and ``worse`` the number of
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

from state.rfm import MS_PER_DAY


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


def recency_bound_ms(recency_days: int, as_of_ms: int) -> int:
    """Largest last-purchase time (epoch ms) whose recency in whole days exceeds ``recency_days``.

    A customer whose last purchase is at or before it is strictly worse on recency.

    >>> recency_bound_ms(0, 10 * MS_PER_DAY) == 9 * MS_PER_DAY
    True
    """
    return as_of_ms - (recency_days + 1) * MS_PER_DAY


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


def fixed_scores(thresholds: FixedThresholds, recency: Sequence[int], frequency: Sequence[int],
                 monetary_minor: Sequence[int]) -> list[tuple[int, int, int]]:
    """Fixed-threshold (R, F, M) scores of several customers."""
    return [(thresholds.r(r), thresholds.f(f), thresholds.m(m))
            for r, f, m in zip(recency, frequency, monetary_minor, strict=True)]
