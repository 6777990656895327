"""Per-event cost of clustering: scoring one customer with a snapshot, and training (one
step of the trainer, amortised over the events of a threshold block). Pure Python, no servers.
Prints figures; asserts nothing.

    .venv/bin/python bench/clustering_cost.py
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

from state.rfm import MS_PER_DAY
from stream.clustering import ClusterModel, features
from stream.settings import Settings
from stream.trainer import TrainerConfig, train

AS_OF = 1_000 * MS_PER_DAY


def population(n: int, seed: int = 1) -> list[tuple[int, int, int]]:
    """CDNOW-like customers: (last purchase ms, frequency, monetary minor)."""
    rng = random.Random(seed)
    return [(AS_OF - rng.randrange(0, 540) * MS_PER_DAY, 1 + int(rng.expovariate(0.5)),
             rng.randrange(500, 50_000)) for _ in range(n)]


def main() -> None:
    settings = Settings()
    config = TrainerConfig(sample_size=settings.train_sample_size)
    pop = population(20_000)
    rng = random.Random(2)
    snap = None
    step_s = []
    for _ in range(20):
        sample = [rng.choice(pop) for _ in range(config.sample_size)]
        t = time.perf_counter()
        snap = train(snap, config, sample, AS_OF, len(pop))
        step_s.append(time.perf_counter() - t)
    model = ClusterModel.from_snapshot(snap)
    xs = [features((AS_OF - last) // MS_PER_DAY, f, m / 100) for last, f, m in pop]
    t = time.perf_counter()
    for x in xs:
        model.predict(x)
    predict_us = (time.perf_counter() - t) / len(xs) * 1e6
    step = statistics.median(step_s)
    block = settings.threshold_refresh_every
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print(f"scoring: {predict_us:.1f} µs per customer (ClusterModel.predict, k={config.n_clusters})")
    print(f"training: {step * 1e3:.1f} ms per step of {config.sample_size} samples "
          f"({step / config.sample_size * 1e6:.1f} µs per sample); one step per {block} "
          f"offsets of partition 0 = {step / block * 1e6:.1f} µs per event of partition 0")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
