"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", Sec. 3.4; the protocol DINO and others report).

Features are L2-normalised; a query's k nearest training features by cosine similarity s_i vote for
their labels with weight exp(s_i / T) (k = 20, T = 0.07 by default); the class with the largest
summed weight wins. Similarities are computed on device in query chunks with `lax.top_k`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _vote(bank, bank_labels, queries, temperature, *, k: int, num_classes: int):
    sims = queries @ bank.T  # [q, n]
    top, idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top / temperature)
    votes = jnp.sum(jax.nn.one_hot(bank_labels[idx], num_classes) * weights[..., None], axis=1)
    return jnp.argmax(votes, axis=-1)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int, *, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Predicted labels of `queries` from the weighted votes of their k nearest `bank` rows."""
    bank_j, labels_j = jnp.asarray(_normalize(bank)), jnp.asarray(bank_labels, jnp.int32)
    k = min(k, bank.shape[0])
    queries = _normalize(queries)
    out = [np.asarray(_vote(bank_j, labels_j, jnp.asarray(queries[i:i + chunk]), temperature, k=k,
                            num_classes=num_classes)) for i in range(0, len(queries), chunk)]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes: int, *, k: int = 20,
                 temperature: float = 0.07) -> float:
    pred = knn_predict(bank, bank_labels, queries, num_classes, k=k, temperature=temperature)
    return float(np.mean(pred == np.asarray(query_labels)))
