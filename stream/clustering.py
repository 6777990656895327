"""Online clustering of customers on their RFM features with River.

Features are log-scaled (``log1p``) recency days, frequency and monetary (currency units),
standardised by River's ``StandardScaler`` and clustered by River's ``KMeans`` with a fixed
seed. The model's snapshot is data (JSON: scaler statistics, centroids, counts), not a pickle:
other processes load it from Redis, and unpickling shared data runs code.

The wrapper speaks River's contract: ``learn_one(x)`` / ``predict_one(x)`` on a feature dict.
``predict_one`` never changes the model (River's ``KMeans.predict_one`` creates centre
coordinates lazily; the wrapper only predicts once every centre has all features).
"""

from __future__ import annotations

import collections
import functools
import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt
from river import cluster, preprocessing

FEATURES = ("recency", "frequency", "monetary")
SNAPSHOT_FORMAT = 1


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
        self.scaler = preprocessing.StandardScaler()
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

    def learn_predict_one(self, x: dict[str, float], new_customer: bool = False) -> int | None:
        """:meth:`learn_one` then :meth:`predict_one`, with one distance computation.

        Learning moves only the closest centroid, and towards ``x``, so it stays the closest:
        the cluster after learning is the one found before it.
        """
        self.scaler.learn_one(x)
        closest = self.kmeans.learn_predict_one(self.scaler.transform_one(x))
        self.n_learned += 1
        if new_customer:
            self.n_customers += 1
        return int(closest) if self.ready else None

    def predict_one(self, x: dict[str, float]) -> int | None:
        """Cluster id of a feature dict, or None before the model is ready. Pure."""
        if not self.ready:
            return None
        return int(self.kmeans.predict_one(self.scaler.transform_one(x)))

    # --- snapshots -----------------------------------------------------------------------
    def to_snapshot(self) -> dict[str, Any]:
        """The model as JSON-able data (format :data:`SNAPSHOT_FORMAT`)."""
        return {
            "format": SNAPSHOT_FORMAT,
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
        if snap.get("format") != SNAPSHOT_FORMAT or snap.get("features") != list(FEATURES):
            raise ValueError(f"unsupported model snapshot format {snap.get('format')!r}")
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


def predict_many(snap: dict[str, Any], x: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Cluster ids of many customers from a snapshot, with numpy (same result as River's).

    Parameters
    ----------
    snap
        A :meth:`CustomerClusterer.to_snapshot` dict.
    x
        Shape (N, 3): log-scaled features in :data:`FEATURES` order.

    Returns
    -------
    ndarray of int64, shape (N,)
        Cluster ids; -1 for all when the snapshot's model is not ready.
    """
    arr = np.asarray(x, dtype=np.float64).reshape(-1, len(FEATURES))
    if snap["n_customers"] < snap["params"]["min_customers"]:
        return np.full(arr.shape[0], -1, dtype=np.int64)
    means = np.array([snap["scaler"]["means"].get(f, 0.0) for f in FEATURES])
    var = np.array([snap["scaler"]["vars"].get(f, 0.0) for f in FEATURES])
    sd = np.sqrt(var)
    z = np.where(var > 0, (arr - means) / np.where(sd > 0, sd, 1.0), 0.0)
    ids = sorted(snap["centroids"], key=int)
    c = np.array([[snap["centroids"][i][f] for f in FEATURES] for i in ids])
    d = ((z[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
    return np.array([int(i) for i in ids], dtype=np.int64)[np.argmin(d, axis=1)]
