"""The clustering wrapper: River's contract, cold start, purity of predict, seeding, and a
lossless JSON snapshot that a numpy predictor reads the same way as River."""

from __future__ import annotations

import copy
import json
import random

import numpy as np

from stream.clustering import FEATURES, CustomerClusterer, features, predict_many


def sample(n: int, seed: int = 1) -> list[dict[str, float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        group = rng.random() < 0.5
        out.append(features(rng.uniform(0, 30) if group else rng.uniform(200, 500),
                            rng.randint(4, 12) if group else 1,
                            rng.uniform(100, 400) if group else rng.uniform(5, 30)))
    return out


def trained(n: int = 300, **kw) -> CustomerClusterer:
    m = CustomerClusterer(**kw)
    for x in sample(n):
        m.learn_one(x, new_customer=True)
    return m


def test_cold_start_gives_no_cluster_until_min_customers():
    m = CustomerClusterer(min_customers=3)
    xs = sample(3)
    m.learn_one(xs[0], new_customer=True)
    m.learn_one(xs[0], new_customer=False)  # same customer again: not a new one
    m.learn_one(xs[1], new_customer=True)
    assert m.predict_one(xs[2]) is None
    m.learn_one(xs[2], new_customer=True)
    assert m.predict_one(xs[2]) in range(5)


def test_predict_never_changes_the_model():
    m = trained()
    before = json.dumps(m.to_snapshot(), sort_keys=True)
    for x in sample(50, seed=9):
        m.predict_one(x)
    assert json.dumps(m.to_snapshot(), sort_keys=True) == before


def test_same_seed_same_model_and_other_seed_differs():
    a, b, c = trained(seed=7), trained(seed=7), trained(seed=8)
    assert a.to_snapshot() == b.to_snapshot()
    assert a.to_snapshot()["centroids"] != c.to_snapshot()["centroids"]


def test_snapshot_round_trip_is_lossless_and_keeps_learning_alike():
    m = trained()
    restored = CustomerClusterer.from_json(m.to_json())
    assert restored.to_snapshot() == m.to_snapshot()
    twin = copy.deepcopy(m)
    for x in sample(100, seed=3):
        twin.learn_one(x)
        restored.learn_one(x)
    assert restored.to_snapshot() == twin.to_snapshot()


def test_two_groups_are_separated():
    m = trained(n=600, n_clusters=2)
    near = m.predict_one(features(5, 8, 250))
    far = m.predict_one(features(400, 1, 10))
    assert near != far


def test_numpy_predictor_agrees_with_river():
    m = trained()
    xs = sample(400, seed=5)
    river_ids = [m.predict_one(x) for x in xs]
    arr = np.array([[x[f] for f in FEATURES] for x in xs])
    assert predict_many(m.to_snapshot(), arr).tolist() == river_ids
    cold = CustomerClusterer(min_customers=10_000).to_snapshot()
    assert (predict_many(cold, arr) == -1).all()


def test_same_seed_same_model_in_processes_with_other_hash_seeds():
    """Python's string hashing differs per process; the model must not."""
    import subprocess
    import sys

    code = ("from stream.clustering import CustomerClusterer, features;"
            "m = CustomerClusterer(seed=42, min_customers=1);"
            "[m.learn_one(features(d, f, d * f), True) for d in range(0, 300, 7) for f in (1, 3, 9)];"
            "print(m.to_json())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}).stdout for h in (1, 2, 3)}
    assert len(outs) == 1


def test_learn_predict_one_equals_learn_then_predict():
    a, b = CustomerClusterer(min_customers=5), CustomerClusterer(min_customers=5)
    for x in sample(300, seed=11):
        a.learn_one(x, new_customer=True)
        expected = a.predict_one(x)
        assert b.learn_predict_one(x, new_customer=True) == expected
    assert a.to_snapshot() == b.to_snapshot()
