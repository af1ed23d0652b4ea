"""Global contrastive losses: every gather mode equals the single-device loss and gradients."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from colearn_jax import sharding
from colearn_jax.losses import contrastive

B, D = 32, 16


def _embeds(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    img = contrastive.l2_normalize(jax.random.normal(k1, (B, D)))
    txt = contrastive.l2_normalize(img + 0.8 * jax.random.normal(k2, (B, D)))
    return img, txt


def _reference_clip(img, txt, scale):
    logits = np.exp(scale) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    def ce(l):
        l = l - l.max(-1, keepdims=True)
        return -(np.diag(l) - np.log(np.exp(l).sum(-1))).mean()
    return 0.5 * (ce(logits) + ce(logits.T))


def _reference_siglip(img, txt, scale, bias):
    logits = np.exp(scale) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T + bias
    z = 2 * np.eye(B) - 1
    return np.sum(np.logaddexp(0, -z * logits)) / B


def test_clip_loss_matches_numpy_reference():
    img, txt = _embeds()
    loss, metrics = contrastive.clip_loss(img, txt, jnp.float32(np.log(1 / 0.07)))
    np.testing.assert_allclose(loss, _reference_clip(img, txt, np.log(1 / 0.07)), rtol=1e-5)
    assert 0.0 <= metrics["i2t_acc"] <= 1.0


def test_siglip_loss_matches_numpy_reference():
    img, txt = _embeds()
    loss, _ = contrastive.siglip_loss(img, txt, jnp.float32(np.log(10.0)), jnp.float32(-10.0))
    np.testing.assert_allclose(loss, _reference_siglip(img, txt, np.log(10.0), -10.0), rtol=1e-5)


MESHES = [dict(data=8, fsdp=1, model=1), dict(data=2, fsdp=2, model=2), dict(data=1, fsdp=4, model=2)]


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "x".join(str(v) for v in m.values()))
@pytest.mark.parametrize("gather", ["auto", "all_gather"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_sharded_loss_and_grads_equal_single_device(mesh_cfg, gather, kind):
    img, txt = _embeds(1)
    scale, bias = jnp.float32(2.0), jnp.float32(-3.0)

    def loss_fn(img, txt, scale, bias, mesh=None, gather="auto"):
        if kind == "clip":
            return contrastive.clip_loss(img, txt, scale, gather=gather, mesh=mesh)[0]
        return contrastive.siglip_loss(img, txt, scale, bias, gather=gather, mesh=mesh)[0]

    ref_loss, ref_grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))(img, txt, scale, bias)

    mesh = sharding.make_mesh(mesh_cfg)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    img_s, txt_s = jax.device_put(img, rows), jax.device_put(txt, rows)
    fn = jax.jit(jax.value_and_grad(lambda *a: loss_fn(*a, mesh=mesh, gather=gather), argnums=(0, 1, 2, 3)))
    loss, grads = fn(img_s, txt_s, scale, bias)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)
    # gradients of the embeddings stay sharded like the embeddings
    assert grads[0].sharding.is_equivalent_to(rows, 2)
    chex.assert_trees_all_equal_shapes(grads, ref_grads)


def test_bad_gather_mode_and_missing_mesh_are_named():
    img, txt = _embeds()
    with pytest.raises(ValueError, match="gather mode 'bogus'"):
        contrastive.clip_loss(img, txt, jnp.float32(1.0), gather="bogus")
    with pytest.raises(ValueError, match="needs the device mesh"):
        contrastive.clip_loss(img, txt, jnp.float32(1.0), gather="all_gather")
