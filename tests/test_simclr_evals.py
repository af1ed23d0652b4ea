"""Linear evaluation (optax probe on frozen features) and weighted k-NN (Wu et al. 2018)."""
import numpy as np
import pytest

from colearn_jax.evals.knn import knn_predict
from colearn_jax.evals.linear_probe import linear_probe, standardize


def _clusters(n, d=16, classes=4, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((classes, d)) * 2 + 5  # far from the origin
    y = rng.integers(0, classes, n)
    return (centres[y] + noise * rng.standard_normal((n, d))).astype(np.float32), y


def test_linear_probe_learns_separable_features_and_not_noise():
    x, y = _clusters(600)
    tx, ty = _clusters(300, seed=1)
    r = linear_probe(x, y, tx, ty, 4, epochs=20, batch_size=64, lr=0.1, weight_decays=[0.0, 1e-2])
    assert r["top1"] > 0.95 and r["train_top1"] > 0.95
    assert r["weight_decay"] in (0.0, 1e-2) and r["holdout_top1"] > 0.9
    rng = np.random.default_rng(3)
    noise = linear_probe(rng.standard_normal((600, 16)), rng.integers(0, 4, 600), rng.standard_normal((400, 16)),
                         rng.integers(0, 4, 400), 4, epochs=20, batch_size=64, weight_decays=[0.0])
    assert noise["top1"] < 0.4  # chance is 0.25: the test split is never fitted


def test_standardize_uses_training_statistics_only():
    train = np.array([[0.0, 10.0], [2.0, 30.0]], np.float32)
    test = np.array([[1.0, 20.0]], np.float32)
    s_train, s_test = standardize(train, test)
    np.testing.assert_allclose(s_train.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(s_test, [[0.0, 0.0]], atol=1e-6)


def _knn_reference(bank, labels, queries, classes, k, t):
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = []
    for row in q @ b.T:
        top = np.argsort(-row)[:k]
        votes = np.zeros(classes)
        for i in top:
            votes[labels[i]] += np.exp(row[i] / t)
        out.append(np.argmax(votes))
    return np.array(out)


@pytest.mark.parametrize("k,t", [(20, 0.07), (5, 1.0), (1, 0.07)])
def test_knn_equals_brute_force(k, t):
    rng = np.random.default_rng(0)
    bank, labels = rng.standard_normal((300, 8)), rng.integers(0, 5, 300)
    queries = rng.standard_normal((70, 8))
    np.testing.assert_array_equal(knn_predict(bank, labels, queries, 5, k=k, temperature=t, chunk=32),
                                  _knn_reference(bank, labels, queries, 5, k, t))


def test_knn_on_clusters_and_scale_invariance():
    x, y = _clusters(500)
    tx, ty = _clusters(200, seed=1)
    pred = knn_predict(x, y, tx, 4)
    assert np.mean(pred == ty) > 0.95
    np.testing.assert_array_equal(knn_predict(3 * x, y, 0.1 * tx, 4), pred)  # cosine: scale-free
