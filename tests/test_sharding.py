"""Sharding presets: one sharded CLIP train step equals the single-device step, and every
parameter's `.sharding` is what the preset promises."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from colearn_jax import sharding
from colearn_jax.train import loop
from colearn_jax.train.state import create_sharded_state
from colearn_jax.train.step import make_train_step
from tests.helpers import load_config, synthetic_clip_batch

PRESET_MESHES = {
    "dp": dict(data=8, fsdp=1, model=1),
    "fsdp": dict(data=2, fsdp=4, model=1),
    "tp": dict(data=4, fsdp=1, model=2),
    "fsdp_tp": dict(data=2, fsdp=2, model=2),
}
# Loss and params after one AdamW step agree to float32 reduction-order noise.
RTOL, ATOL = 2e-5, 2e-6


def _config(preset, mesh_cfg, gather="auto", variant="tiny"):
    c = load_config(f"clip.py:{variant}")
    c.unlock()
    c.sharding = preset
    c.mesh.update(mesh_cfg)
    c.loss.gather = gather
    c.model.scan = True
    return c


def _one_step(config, devices=None):
    system, model, mesh, rules, tx, schedule = loop.build(config, devices=devices)
    dp = sharding.data_parallel_size(mesh, rules)
    example = synthetic_clip_batch(config, dp)
    state, shardings = create_sharded_state(model, tx, example, mesh, rules, jax.random.PRNGKey(0))
    init_params = jax.device_get(state.params)
    step = jax.jit(
        make_train_step(model, system.make_objective(config, mesh, rules), tx, schedule, system.constrain_params, rules),
        in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    batch = sharding.shard_batch(synthetic_clip_batch(config, seed=1), mesh, rules)
    with jax.set_mesh(mesh):
        new_state, metrics = step(state, batch)
    return init_params, new_state, metrics


@pytest.fixture(scope="module")
def reference():
    config = _config("dp", dict(data=1, fsdp=1, model=1))
    init, state, metrics = _one_step(config, devices=jax.devices()[:1])
    return init, jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("preset", list(PRESET_MESHES))
def test_sharded_step_equals_single_device(preset, reference):
    ref_init, ref_params, ref_metrics = reference
    config = _config(preset, PRESET_MESHES[preset], gather="all_gather" if preset == "fsdp_tp" else "auto")
    init, state, metrics = _one_step(config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), init, ref_init)  # same init, any layout
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=RTOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=RTOL, atol=ATOL),
        jax.device_get(state.params), ref_params,
    )
    _check_param_shardings(preset, state)


@pytest.mark.parametrize("variant", ["tiny", "tiny,siglip"])
def test_ring_loss_inside_a_sharded_train_step(variant):
    """CLIP and SigLIP train steps with gather='ring' under fsdp_tp equal the single-device step."""
    _, ref_state, ref_metrics = _one_step(_config("dp", dict(data=1, fsdp=1, model=1), variant=variant),
                                          devices=jax.devices()[:1])
    _, state, metrics = _one_step(_config("fsdp_tp", PRESET_MESHES["fsdp_tp"], gather="ring", variant=variant))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=RTOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL),
        jax.device_get(state.params), jax.device_get(ref_state.params),
    )


def _spec(x):
    return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def _check_param_shardings(preset, state):
    p = state.params
    fc = p["vision"]["transformer"]["layers"]["block"]["mlp"]["fc"]["kernel"]  # [layers, embed, mlp]
    query = p["text"]["transformer"]["layers"]["block"]["attn"]["query"]["kernel"]  # [layers, embed, heads, kv]
    tok = p["text"]["token_embedding"]["embedding"]  # [vocab, embed]
    mu_fc = state.opt_state[1][0].mu["vision"]["transformer"]["layers"]["block"]["mlp"]["fc"]["kernel"]
    data = ("data", "fsdp")
    if preset == "dp":
        for leaf in jax.tree.leaves(p):
            assert leaf.sharding.is_fully_replicated
    elif preset == "fsdp":
        assert _spec(fc) == (None, data, None)
        assert _spec(query) == (None, data, None, None)
        assert data in _spec(tok)  # the embedding table is split over the data axes
        assert _spec(mu_fc) == _spec(fc)  # ZeRO: optimizer moments sharded like the params
        assert fc.addressable_shards[0].data.shape[1] == fc.shape[1] // 8
    elif preset == "tp":
        assert _spec(fc) == (None, None, "model")
        assert _spec(query) == (None, None, "model", None)
        assert _spec(tok) == ("model", None)
    elif preset == "fsdp_tp":
        assert _spec(fc) == (None, data, "model")
        assert _spec(query) == (None, data, "model", None)
        assert _spec(mu_fc) == _spec(fc)
    assert state.params["logit_scale"].sharding.is_fully_replicated


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs 16 devices but only 8"):
        sharding.make_mesh(dict(data=4, fsdp=2, model=2))
    with pytest.raises(ValueError, match="config.mesh has unknown axes"):
        sharding.make_mesh(dict(data=-1, pipeline=2))
    with pytest.raises(ValueError, match="config.sharding='zero9' is not a preset"):
        sharding.get_rules("zero9")
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, model=1))
    with pytest.raises(ValueError, match="config.data.batch_size=12 is not divisible by the 8"):
        sharding.check_batch_divisible(12, mesh, sharding.get_rules("dp"))
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
    assert sharding.batch_axes(sharding.get_rules("fsdp")) == ("data", "fsdp")
    assert P(("data", "fsdp")) == sharding.batch_sharding(mesh, sharding.get_rules("dp")).spec
