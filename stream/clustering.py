"""Online clustering of customers on their RFM features with River.

Features are log-scaled (``log1p``) recency days, frequency and monetary (currency units),
standardised by :class:`RunningScaler` (River's ``StandardScaler`` update, see there) and
clustered by River's ``KMeans`` with a fixed seed. The model's snapshot is data (JSON: scaler
statistics, centroids, counts), not a pickle: other processes load it from Redis, and
unpickling shared data runs code.

The wrapper speaks River's contract: ``learn_one(x)`` / ``predict_one(x)`` on a feature dict.
``predict_one`` never changes the model (River's ``KMeans.predict_one`` creates centre
coordinates lazily; the wrapper only predicts once every centre has all features).
"""

from __future__ import annotations

import collections
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.ma  # noqa: F401 - np.median imports it on first use: at start-up, not in a step
import numpy.typing as npt
from river import cluster

FEATURES = ("recency", "frequency", "monetary")
SNAPSHOT_FORMAT = 2


def features(recency_days: float, frequency: float, monetary: float) -> dict[str, float]:
    """Log-scaled feature dict of one customer.

    Parameters
    ----------
    recency_days
        Days since the last purchase (>= 0).
    frequency
        Distinct purchase orders (>= 0).
    monetary
        Net spend in currency units (>= 0).

    >>> features(0, 1, math.e - 1)
    {'recency': 0.0, 'frequency': 0.6931471805599453, 'monetary': 1.0}
    """
    return {"recency": math.log1p(recency_days), "frequency": math.log1p(frequency),
            "monetary": math.log1p(monetary)}


def check_snapshot(snap: dict[str, Any]) -> None:
    """Raise ValueError unless ``snap`` has this module's format and feature list."""
    if snap.get("format") != SNAPSHOT_FORMAT or snap.get("features") != list(FEATURES):
        raise ValueError(f"unsupported model snapshot format {snap.get('format')!r}")


class RunningScaler:
    """Standardisation by running mean and population variance per feature: the update and
    transform of River 0.26's ``preprocessing.StandardScaler`` (``with_std=True``, no window),
    with its attributes, so snapshots keep their ``counts``/``means``/``vars`` and a model
    learns to the same bits (``tests/unit/test_clustering.py`` checks it against River's class).
    One difference: :meth:`transform_one` of a feature never learned stores nothing (River's
    stores a variance of 0 for it).

    Why not River's class itself: importing ``river.preprocessing`` imports scikit-learn,
    pandas and pyarrow (its ``GapEncoder``), ~160 MiB of resident memory and ~2 s of start-up
    in every worker and CLI process, for these few lines. The update is Welford's running mean
    and variance (West 1979, "Updating mean and variance estimates"):
    ``mean += (x - mean) / n``, ``var += ((x - old mean) * (x - mean) - var) / n``.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.means: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.vars: collections.defaultdict[str, float] = collections.defaultdict(float)

    def learn_one(self, x: dict[str, float]) -> None:
        """Update the statistics with one feature dict."""
        counts, means, vars_ = self.counts, self.means, self.vars
        for i, xi in x.items():
            counts[i] += 1
            old_mean = means[i]
            means[i] += (xi - old_mean) / counts[i]
            vars_[i] += ((xi - old_mean) * (xi - means[i]) - vars_[i]) / counts[i]

    def transform_one(self, x: dict[str, float]) -> dict[str, float]:
        """``(x - mean) / sd`` per feature; 0.0 where the variance is 0 (or the feature was
        never learned). Pure."""
        means, vars_ = self.means, self.vars
        out = {}
        for i, xi in x.items():
            v = vars_.get(i, 0.0)
            out[i] = (xi - means.get(i, 0.0)) / v ** 0.5 if v else 0.0
        return out


class CustomerClusterer:
    """``StandardScaler | KMeans`` over :func:`features`, with a cold start and JSON snapshots.

    Parameters
    ----------
    n_clusters
        Number of KMeans centroids (>= 2).
    seed
        Seed of KMeans' random initial centroids.
    halflife
        KMeans step: how far the closest centroid moves towards each learned point (0-1].
    min_customers
        :meth:`predict_one` returns None until the model has learned from this many distinct
        customers (callers say which updates are a customer's first).

    Raises
    ------
    ValueError
        On out-of-range parameters.
    """

    def __init__(self, n_clusters: int = 5, seed: int = 42, halflife: float = 0.05,
                 min_customers: int = 100):
        if n_clusters < 2 or not 0 < halflife <= 1 or min_customers < 1:
            raise ValueError(f"bad parameters n_clusters={n_clusters} halflife={halflife} "
                             f"min_customers={min_customers}")
        self.n_clusters, self.seed = n_clusters, seed
        self.halflife, self.min_customers = halflife, min_customers
        self.scaler = RunningScaler()
        self.kmeans = cluster.KMeans(n_clusters=n_clusters, halflife=halflife, seed=seed)
        # River creates centre coordinates lazily, in the iteration order of a set of feature
        # names, which depends on PYTHONHASHSEED: draw them now, in a fixed order, so that the
        # same seed gives the same model in every process.
        for centre in self.kmeans.centers.values():
            for f in FEATURES:
                centre[f]  # noqa: B018 - the defaultdict draws the initial coordinate
        self.n_learned = 0
        self.n_customers = 0

    @property
    def ready(self) -> bool:
        """True once the model has learned from ``min_customers`` distinct customers."""
        return self.n_customers >= self.min_customers

    def learn_one(self, x: dict[str, float], new_customer: bool = False) -> None:
        """Learn from one customer's current features (the scaler first, then KMeans)."""
        self.scaler.learn_one(x)
        self.kmeans.learn_one(self.scaler.transform_one(x))
        self.n_learned += 1
        if new_customer:
            self.n_customers += 1

    def predict_one(self, x: dict[str, float]) -> int | None:
        """Cluster id of a feature dict, or None before the model is ready. Pure."""
        if not self.ready:
            return None
        return int(self.kmeans.predict_one(self.scaler.transform_one(x)))

    # --- snapshots -----------------------------------------------------------------------
    def to_snapshot(self, version: int = 0, ids: dict[int, int] | None = None,
                    profiles: list[dict[str, Any]] | None = None, **extra: Any
                    ) -> dict[str, Any]:
        """The model as JSON-able data (format :data:`SNAPSHOT_FORMAT`), with its published
        ``version``, the public id of each centroid (``ids``: internal -> public; identity when
        None), cluster ``profiles`` and ``extra`` fields."""
        return {
            "format": SNAPSHOT_FORMAT, "version": version,
            "ids": {str(i): int(p) for i, p in (ids or {i: i for i in self.kmeans.centers}).items()},
            "profiles": profiles or [], **extra,
            "features": list(FEATURES),
            "params": {"n_clusters": self.n_clusters, "seed": self.seed,
                       "halflife": self.halflife, "min_customers": self.min_customers},
            "n_learned": self.n_learned,
            "n_customers": self.n_customers,
            "scaler": {"counts": dict(self.scaler.counts), "means": dict(self.scaler.means),
                       "vars": dict(self.scaler.vars)},
            "centroids": {str(i): dict(c) for i, c in self.kmeans.centers.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_snapshot(), sort_keys=True)

    @classmethod
    def from_snapshot(cls, snap: dict[str, Any]) -> CustomerClusterer:
        """Rebuild a model from :meth:`to_snapshot` data; it learns and predicts on as before.

        Raises
        ------
        ValueError
            When the snapshot has another format or feature list.
        """
        check_snapshot(snap)
        m = cls(**snap["params"])
        m.n_learned, m.n_customers = int(snap["n_learned"]), int(snap["n_customers"])
        m.scaler.counts = collections.Counter(snap["scaler"]["counts"])
        m.scaler.means = collections.defaultdict(float, snap["scaler"]["means"])
        m.scaler.vars = collections.defaultdict(float, snap["scaler"]["vars"])
        gauss = functools.partial(m.kmeans._rng.gauss, m.kmeans.mu, m.kmeans.sigma)
        m.kmeans.centers = {int(i): collections.defaultdict(gauss, c)
                            for i, c in snap["centroids"].items()}
        return m

    @classmethod
    def from_json(cls, text: str) -> CustomerClusterer:
        return cls.from_snapshot(json.loads(text))


@dataclass(frozen=True)
class ClusterModel:
    """What workers score with: one published snapshot of the trainer's model (read only).

    Cluster ids are *public* ids: they keep their meaning across snapshots (see
    :func:`match_ids`). ``predict`` is a pure function of the features and the snapshot, so
    every worker that holds version ``v`` gives a customer the same id.

    Parameters
    ----------
    version
        Snapshot version (1, 2, ...), carried by segment-change events as ``model_version``.
    means, sds
        Scaler statistics per feature (:data:`FEATURES` order); sd 0 scales to 0.
    centroids
        Shape (k, 3): standardised centroids in public id order (row i = id ``ids[i]``).
    ids
        Public ids of the rows.
    ready
        False while the model has learned from fewer customers than the cold-start minimum:
        then no customer gets a cluster id.
    profiles
        Readable profile of each cluster (see :func:`profiles`).
    as_of_ms
        Event time the snapshot was trained at (epoch ms), when known.
    """

    version: int
    means: tuple[float, ...]
    sds: tuple[float, ...]
    centroids: npt.NDArray[np.float64]
    ids: tuple[int, ...]
    ready: bool
    profiles: tuple[dict[str, Any], ...] = ()
    as_of_ms: int | None = None

    @classmethod
    def from_snapshot(cls, snap: dict[str, Any]) -> ClusterModel:
        """The scoring view of a :meth:`CustomerClusterer.to_snapshot` dict.

        Raises
        ------
        ValueError
            When the snapshot has another format or feature list.
        """
        check_snapshot(snap)
        means = tuple(float(snap["scaler"]["means"].get(f, 0.0)) for f in FEATURES)
        sds = tuple(math.sqrt(float(snap["scaler"]["vars"].get(f, 0.0))) for f in FEATURES)
        public = {int(k): int(v) for k, v in snap.get("ids", {}).items()}
        rows = sorted(snap["centroids"], key=lambda i: public.get(int(i), int(i)))
        ids = tuple(public.get(int(i), int(i)) for i in rows)
        c = np.array([[float(snap["centroids"][i][f]) for f in FEATURES] for i in rows])
        ready = int(snap["n_customers"]) >= int(snap["params"]["min_customers"])
        as_of = snap.get("as_of_ms")
        return cls(int(snap.get("version", 0)), means, sds, c, ids, ready,
                   tuple(snap.get("profiles", ())), None if as_of is None else int(as_of))

    def _z(self, arr: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        mean, sd = np.array(self.means), np.array(self.sds)
        return np.where(sd > 0, (arr - mean) / np.where(sd > 0, sd, 1.0), 0.0)

    def predict(self, x: dict[str, float]) -> int | None:
        """Public cluster id of one feature dict (:func:`features`), or None when not ready."""
        return self._nearest(x["recency"], x["frequency"], x["monetary"])

    def predict_rfm(self, recency_days: float, frequency: float, monetary: float) -> int | None:
        """:meth:`predict` of ``features(recency_days, frequency, monetary)`` (the planner's
        hot path: no dict)."""
        return self._nearest(math.log1p(recency_days), math.log1p(frequency),
                             math.log1p(monetary))

    def _nearest(self, *x: float) -> int | None:
        if not self.ready:
            return None
        (m0, m1, m2), (s0, s1, s2) = self.means, self.sds
        z0 = (x[0] - m0) / s0 if s0 > 0 else 0.0
        z1 = (x[1] - m1) / s1 if s1 > 0 else 0.0
        z2 = (x[2] - m2) / s2 if s2 > 0 else 0.0
        best, best_d = 0, math.inf
        for i, (c0, c1, c2) in enumerate(self._rows):
            d = (z0 - c0) ** 2 + (z1 - c1) ** 2 + (z2 - c2) ** 2
            if d < best_d:
                best, best_d = i, d
        return self.ids[best]

    @functools.cached_property
    def _rows(self) -> list[tuple[float, float, float]]:
        return [tuple(row) for row in self.centroids.tolist()]

    def predict_many(self, x: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Public cluster ids of many customers; shape (N, 3) log-scaled features in
        :data:`FEATURES` order -> (N,) int64, all -1 when not ready."""
        arr = np.asarray(x, dtype=np.float64).reshape(-1, len(FEATURES))
        if not self.ready:
            return np.full(arr.shape[0], -1, dtype=np.int64)
        d = ((self._z(arr)[:, None, :] - self.centroids[None, :, :]) ** 2).sum(axis=2)
        return np.array(self.ids, dtype=np.int64)[np.argmin(d, axis=1)]

    def centroids_original(self) -> npt.NDArray[np.float64]:
        """Centroids in log-feature units (un-standardised), shape (k, 3), public id order."""
        return self.centroids * np.array(self.sds) + np.array(self.means)


def predict_many(snap: dict[str, Any], x: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Cluster ids of many customers from a snapshot dict (see :meth:`ClusterModel.predict_many`).

    >>> m = CustomerClusterer(min_customers=1)
    >>> m.learn_one(features(3, 1, 20), new_customer=True)
    >>> predict_many(m.to_snapshot(), [[0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]).tolist()  # one centroid
    [0, 0]
    """
    return ClusterModel.from_snapshot(snap).predict_many(x)


def match_ids(previous: ClusterModel | None, current: ClusterModel) -> dict[int, int]:
    """Public ids for ``current``'s rows that keep the meaning of ``previous``'s: the pairing of
    centroids (in log-feature units) with the least total squared distance (the Hungarian
    method, ``scipy.optimize.linear_sum_assignment``). Returns ``{current row id: public id}``;
    with no previous model, ids stay as they are.

    >>> import numpy as np
    >>> a = ClusterModel(1, (0.0,) * 3, (1.0,) * 3, np.array([[0.0, 0, 0], [5, 5, 5]]), (0, 1), True)
    >>> b = ClusterModel(2, (0.0,) * 3, (1.0,) * 3, np.array([[5.1, 5, 5], [0.1, 0, 0]]), (0, 1), True)
    >>> match_ids(a, b)
    {0: 1, 1: 0}
    """
    if previous is None or len(previous.ids) != len(current.ids):
        return {i: i for i in current.ids}
    # imported here: scipy.optimize is ~430 modules and 0.3-0.6 s, which the event loop of
    # the worker training its first model waited for (a model is re-created only when its
    # parameters change)
    from scipy.optimize import linear_sum_assignment
    old, new = previous.centroids_original(), current.centroids_original()
    cost = ((new[:, None, :] - old[None, :, :]) ** 2).sum(axis=2)
    rows, cols = linear_sum_assignment(cost)
    return {current.ids[r]: previous.ids[c] for r, c in zip(rows, cols, strict=True)}


_VALUE_NAMES = {5: ("top", "high", "middle", "low", "lowest")}


def profiles(model: ClusterModel, recency_days: npt.ArrayLike, frequency: npt.ArrayLike,
             monetary: npt.ArrayLike, population: int, currency_decimals: int = 2
             ) -> list[dict[str, Any]]:
    """Readable profiles of the clusters from a sample of customers (original units).

    Each profile: ``cluster`` (public id), ``size`` (estimated customers: the cluster's share
    of the sample times ``population``), ``share``, ``median_recency_days``,
    ``median_frequency``, ``median_monetary`` (currency units) and a ``label``: clusters ranked
    by median monetary x median frequency ("top value", ..., "lowest value"), "active" when the
    median recency is at most the sample's, else "lapsed".

    Parameters
    ----------
    recency_days, frequency, monetary
        Shape (N,) each: the sampled customers' values.
    currency_decimals
        The currency's minor-unit digits: ``median_monetary`` is rounded to one more (a
        median of an even count is halfway between two amounts), so that binary floats do not
        show as ``392.46000000000004`` (a fresh user's ``/clusters``).
    """
    r, f, m = (np.asarray(a, dtype=np.float64) for a in (recency_days, frequency, monetary))
    x = np.log1p(np.c_[r, f, m])
    assigned = model.predict_many(x)
    rows = []
    for cid in model.ids:
        mask = assigned == cid
        n = int(mask.sum())
        rows.append({"cluster": cid, "share": n / max(len(r), 1),
                     "size": round(population * n / max(len(r), 1)),
                     "median_recency_days": float(np.median(r[mask])) if n else None,
                     "median_frequency": float(np.median(f[mask])) if n else None,
                     "median_monetary": (round(float(np.median(m[mask])),
                                               currency_decimals + 1) if n else None)})
    k = len(rows)
    names = _VALUE_NAMES.get(k) or tuple(f"value rank {i + 1} of {k}" for i in range(k))
    order = sorted(rows, key=lambda p: -((p["median_monetary"] or 0) * (p["median_frequency"]
                                                                        or 0)))
    overall = float(np.median(r)) if len(r) else 0.0
    for rank, p in enumerate(order):
        activity = ("active" if p["median_recency_days"] is not None
                    and p["median_recency_days"] <= overall else "lapsed")
        p["label"] = f"{names[rank]} value, {activity}"
    return rows
