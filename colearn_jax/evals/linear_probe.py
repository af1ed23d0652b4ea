"""Linear evaluation on frozen features (Chen et al. 2020, Sec. 2.3 "linear evaluation protocol";
Kolesnikov et al. 2019): a linear softmax classifier trained on fixed features, top-1 on held-out data.

As the reference's linear evaluation, SGD with Nesterov momentum 0.9 and a cosine-decayed learning
rate (not LARS); unlike it, the features are extracted once (no augmentation during the probe's
training, which makes it a few seconds instead of 90 epochs over images) and standardised with the
training features' mean and standard deviation, so one learning rate suits any encoder and raw pixels.

The L2 penalty is picked from `weight_decays` on a held-out `holdout_fraction` of the *training*
features (never on the test split); the classifier is then refitted on all of them. Every
(penalty, train-or-refit) fit runs in one jitted, vmapped `lax.scan`: one compilation, on device.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def standardize(train_x: np.ndarray, *others: np.ndarray, eps: float = 1e-6):
    """Each array minus the training mean, divided by the training standard deviation (per feature)."""
    mean = train_x.mean(0, keepdims=True)
    std = train_x.std(0, keepdims=True) + eps
    return tuple(((x - mean) / std).astype(np.float32) for x in (train_x, *others))


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _fit(x, y, weights, l2, key, lr, momentum, *, num_classes: int, epochs: int, batch_size: int):
    """Per-example `weights` (0 drops a row: the held-out split) and `l2` may be vmapped over."""
    n, d = x.shape
    steps_per_epoch = n // batch_size
    schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
    tx = optax.sgd(schedule, momentum=momentum, nesterov=True)
    params = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}

    def loss_fn(p, xb, yb, wb):
        logits = xb @ p["w"] + p["b"]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=-1)[:, 0]
        return jnp.sum(wb * ce) / jnp.maximum(jnp.sum(wb), 1.0) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    def step(carry, idx):
        p, s = carry
        g = jax.grad(loss_fn)(p, x[idx], y[idx], weights[idx])
        updates, s = tx.update(g, s, p)
        return (optax.apply_updates(p, updates), s), None

    def epoch(carry, k):
        order = jax.random.permutation(k, n)[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
        return jax.lax.scan(step, carry, order)[0], None

    (params, _), _ = jax.lax.scan(epoch, (params, tx.init(params)), jax.random.split(key, epochs))
    return params


def _predict(params, x: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.argmax(jnp.asarray(x) @ params["w"] + params["b"], axis=-1))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
                 *, epochs: int = 100, batch_size: int = 256, lr: float = 0.1, momentum: float = 0.9,
                 weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3), holdout_fraction: float = 0.1,
                 seed: int = 0) -> dict[str, float]:
    """Trains the probe on (train_x, train_y); returns {"top1", "train_top1", "weight_decay", "holdout_top1"}."""
    train_x, test_x = standardize(np.asarray(train_x, np.float32), np.asarray(test_x, np.float32))
    train_y, test_y = np.asarray(train_y, np.int32), np.asarray(test_y, np.int32)
    n = len(train_y)
    batch_size = min(batch_size, n)
    wds = [float(w) for w in weight_decays]
    held = np.zeros(n, bool)
    if len(wds) > 1:
        held[np.random.default_rng(seed).permutation(n)[: max(1, int(holdout_fraction * n))]] = True
    fit_mask = np.stack([~held] * len(wds) + [np.ones(n, bool)] * len(wds)).astype(np.float32)
    l2 = np.asarray(wds + wds, np.float32)
    fits = jax.vmap(functools.partial(_fit, num_classes=num_classes, epochs=epochs, batch_size=batch_size),
                    in_axes=(None, None, 0, 0, None, None, None))
    params = fits(jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(fit_mask), jnp.asarray(l2),
                  jax.random.PRNGKey(seed), lr, momentum)
    params = jax.tree.map(np.asarray, params)
    pick = lambda i: jax.tree.map(lambda a: a[i], params)  # noqa: E731
    if len(wds) > 1:
        held_acc = [float(np.mean(_predict(pick(i), train_x[held]) == train_y[held])) for i in range(len(wds))]
        best = int(np.argmax(held_acc))
    else:
        held_acc, best = [float("nan")], 0
    final = pick(len(wds) + best)
    return {
        "top1": float(np.mean(_predict(final, test_x) == test_y)),
        "train_top1": float(np.mean(_predict(final, train_x) == train_y)),
        "weight_decay": wds[best],
        "holdout_top1": held_acc[best],
    }
