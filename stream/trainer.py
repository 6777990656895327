"""The clustering trainer: one model for the whole consumer group, trained at deterministic
points, published as versioned snapshots that every worker scores with.

Exactly one worker trains: the owner of partition 0 of the input topic (Kafka's group
assignment gives every partition one owner). When partition 0's offsets enter a new block of
``RFM_THRESHOLD_REFRESH_EVERY``, its step draws a sample of the whole population (customers at ranks chosen by
a generator seeded with the model version: the same population gives the same sample), computes
their features at the as-of time and lets River's model learn them. The model thus follows the
population as it stands, recency included (the features of purchase events alone always have
recency 0).

The new snapshot (JSON, never a pickle: scaler statistics, centroids, the public id of each
centroid, cluster profiles, version) is written by partition 0's commit, atomically with the
step that trained it: a restarted or replaced trainer resumes exactly from it, and a replay of
one partition reproduces every snapshot. Public ids keep their meaning: a re-created model (new
parameters) has its centroids matched to the previous snapshot's (:func:`match_ids`). No
snapshot is ready before the population reaches the cold-start minimum.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from state.rfm import recency_days
from stream.clustering import ClusterModel, CustomerClusterer, features, match_ids, profiles

TRAINER_PARTITION = 0


@dataclass(frozen=True, slots=True)
class TrainerConfig:
    """Parameters of the model and of its training.

    ``sample_size``: customers learned per step; the rest are River ``KMeans`` parameters and
    the cold-start minimum. Steps happen when partition 0's offsets enter a new block of
    ``RFM_THRESHOLD_REFRESH_EVERY`` (the batch is split there anyway).
    """

    n_clusters: int = 5
    seed: int = 42
    halflife: float = 0.05
    min_customers: int = 100
    sample_size: int = 500

    @property
    def params(self) -> dict[str, Any]:
        return {"n_clusters": self.n_clusters, "seed": self.seed, "halflife": self.halflife,
                "min_customers": self.min_customers}


def sample_ranks(version: int, seed: int, population: int, size: int) -> list[int]:
    """The population ranks (0-based, with repeats) a training step samples: drawn by a
    generator seeded with ``(seed, version)``, so the same step samples the same ranks.

    >>> sample_ranks(3, 42, 10, 4) == sample_ranks(3, 42, 10, 4) != sample_ranks(4, 42, 10, 4)
    True
    """
    rng = random.Random(f"{seed}:{version}")
    return [rng.randrange(population) for _ in range(size)] if population else []


def train(previous: dict[str, Any] | None, config: TrainerConfig,
          sample: list[tuple[int, int, int]], as_of_ms: int, population: int,
          currency_decimals: int = 2) -> dict[str, Any]:
    """One training step: the next snapshot after learning ``sample`` at ``as_of_ms``.

    Parameters
    ----------
    previous
        The latest snapshot, or None. Its model is continued when its parameters are the
        configured ones, else a fresh model is trained and its ids matched to the previous ones.
    sample
        ``(last purchase ms, frequency, monetary minor)`` of the sampled customers.
    population
        Customers in the population (the cold-start rule and cluster sizes use it).

    Returns
    -------
    dict
        The snapshot (version = previous + 1).
    """
    continued = previous is not None and previous.get("params") == config.params
    model = (CustomerClusterer.from_snapshot(previous) if continued and previous
             else CustomerClusterer(**config.params))
    scale = 10 ** currency_decimals
    days = [recency_days(last, as_of_ms) for last, _, _ in sample]
    for d, (_, f, m) in zip(days, sample, strict=True):
        model.learn_one(features(d, f, m / scale))
    model.n_customers = population
    version = (int(previous.get("version", 0)) if previous else 0) + 1
    old = ClusterModel.from_snapshot(previous) if previous else None
    if continued and previous:
        ids = {int(k): int(v) for k, v in previous.get("ids", {}).items()}
    else:
        ids = match_ids(old, ClusterModel.from_snapshot(model.to_snapshot(version)))
    scoring = ClusterModel.from_snapshot(model.to_snapshot(version, ids))
    r = np.array(days, dtype=np.float64)
    f = np.array([x[1] for x in sample], dtype=np.float64)
    m = np.array([x[2] for x in sample], dtype=np.float64) / scale
    return model.to_snapshot(version, ids,
                             profiles(scoring, r, f, m, population, currency_decimals),
                             population=population, as_of_ms=as_of_ms)


def dumps(snapshot: dict[str, Any]) -> str:
    """A snapshot as JSON text (keys sorted: the same snapshot gives the same text)."""
    return json.dumps(snapshot, sort_keys=True)
