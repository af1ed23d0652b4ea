"""Sharding presets are a config change, not a result change: on the 8-device mesh, every preset and
gather mode gives the single-device loss, gradients, and parameters (and BatchNorm statistics) after
two steps with a non-zero learning rate; each parameter's `.sharding` is what the preset promises."""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from colearn_jax import sharding
from colearn_jax.train.program import TrainProgram
from tests.helpers import load_config, synthetic_clip_batch

PRESET_MESHES = {
    "dp": dict(data=8, fsdp=1, model=1),
    "fsdp": dict(data=2, fsdp=4, model=1),
    "tp": dict(data=4, fsdp=1, model=2),
    "fsdp_tp": dict(data=2, fsdp=2, model=2),
}
CUBE = dict(data=2, fsdp=2, model=2)
# Float32 reduction-order noise. The steps use SGD with momentum: AdamW divides by sqrt(v), which turns
# the noise of a near-zero gradient element into a whole-lr update and would force a loose tolerance.
# Gradients: relative to each leaf's scale, plus 1e-7 for leaves whose gradient is zero up to noise
# (the attention key bias: softmax ignores it).
RTOL, ATOL = 2e-5, 2e-6
GRAD_RTOL = 2e-5
RESNET_TOWER = dict(type="resnet", image_size=32, layers=[1, 1, 1, 1], width=8, heads=2)


def _config(preset, mesh_cfg, gather="auto", variant="tiny", resnet=False):
    c = load_config(f"clip.py:{variant}")
    c.unlock()
    c.sharding = preset
    c.mesh.update(mesh_cfg)
    c.loss.gather = gather
    c.model.scan = True
    c.optim.update(name="sgd", lr=0.05, momentum=0.9, warmup_steps=0)  # lr > 0 from the first step
    if resnet:
        c.model.vision = RESNET_TOWER
        c.data.image_size = 32
    return c


def _two_steps(config, devices=None, make_batch=synthetic_clip_batch):
    program = TrainProgram.build(config, devices=devices)
    state = program.init_state()
    init = jax.device_get(state.params)
    batches = [program.place_batch(make_batch(config, seed=s)) for s in (1, 2)]
    loss, grads = program.grads(state, batches[0])
    out = dict(init=init, loss0=float(loss), grads=jax.device_get(grads), losses=[], lrs=[])
    for batch in batches:
        state, metrics = program.step(state, batch)
        out.setdefault("model_state_1", jax.device_get(state.model_state))
        out["losses"].append(float(metrics["loss"]))
        out["lrs"].append(float(metrics["lr"]))
    out.update(params=jax.device_get(state.params), model_state=jax.device_get(state.model_state), state=state)
    return out


def _close(a, b, rtol=RTOL, atol=ATOL):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _assert_equal_runs(run, ref):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), run["init"], ref["init"])  # same init, any layout
    assert min(ref["lrs"]) > 0
    np.testing.assert_allclose(run["loss0"], ref["loss0"], rtol=RTOL)
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=RTOL)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=GRAD_RTOL, atol=GRAD_RTOL * np.max(np.abs(y)) + 1e-7),
                 run["grads"], ref["grads"])
    _close(run["params"], ref["params"])
    _close(run["model_state_1"], ref["model_state_1"], atol=1e-6)  # statistics of the first (global) batch
    _close(run["model_state"], ref["model_state"])


@pytest.fixture(scope="module")
def reference():
    ref = _two_steps(_config("dp", dict(data=1, fsdp=1, model=1)), devices=jax.devices()[:1])
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(ref["init"]))]
    assert np.median(moved) > 100 * ATOL  # two real updates: a parameter comparison that can fail
    return ref


@pytest.mark.parametrize("preset", list(PRESET_MESHES))
def test_sharded_steps_equal_single_device(preset, reference):
    run = _two_steps(_config(preset, PRESET_MESHES[preset]))
    _assert_equal_runs(run, reference)
    _check_param_shardings(preset, run["state"])


@pytest.mark.parametrize("gather", ["all_gather", "ring"])
def test_gather_modes_on_the_cube_mesh_equal_single_device(gather, reference):
    _assert_equal_runs(_two_steps(_config("fsdp_tp", CUBE, gather=gather)), reference)


def test_siglip_ring_on_the_cube_mesh_equals_single_device():
    ref = _two_steps(_config("dp", dict(data=1, fsdp=1, model=1), variant="tiny,siglip"), devices=jax.devices()[:1])
    _assert_equal_runs(_two_steps(_config("fsdp_tp", CUBE, gather="ring", variant="tiny,siglip")), ref)


def test_batchnorm_model_global_statistics_equal_single_device():
    """CLIP with a ModifiedResNet image tower: BatchNorm statistics over the global batch, so the
    running statistics after two steps on the 2x2x2 mesh equal one device's."""
    ref = _two_steps(_config("dp", dict(data=1, fsdp=1, model=1), resnet=True), devices=jax.devices()[:1])
    run = _two_steps(_config("fsdp", CUBE, resnet=True))
    assert jax.tree.leaves(ref["model_state"])  # there are batch statistics to compare
    _assert_equal_runs(run, ref)


def _spec(x):
    return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def _check_param_shardings(preset, state):
    p = state.params
    fc = p["vision"]["transformer"]["layers"]["block"]["mlp"]["fc"]["kernel"]  # [layers, embed, mlp]
    query = p["text"]["transformer"]["layers"]["block"]["attn"]["query"]["kernel"]  # [layers, embed, heads, kv]
    tok = p["text"]["token_embedding"]["embedding"]  # [vocab, embed]
    mu_fc = jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
    mu_fc = [s for s in mu_fc if isinstance(s, optax.TraceState)][0].trace
    mu_fc = mu_fc["vision"]["transformer"]["layers"]["block"]["mlp"]["fc"]["kernel"]  # momentum buffer
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


def _as_processes(index_map, process_of):
    """{device: index} with each device replaced by a stand-in that reports `process_of(device)`."""
    import collections

    fake = collections.namedtuple("FakeDevice", "id process_index")
    return {fake(d.id, process_of(d)): idx for d, idx in index_map.items()}


def test_each_process_must_hold_its_contiguous_block_of_the_batch():
    """Multi-process feeding (shard_batch): process p's devices must hold rows [p*b, (p+1)*b)."""
    dp = sharding.get_rules("dp")
    by_order = {d.id: i for i, d in enumerate(jax.devices())}
    flat = sharding.batch_sharding(sharding.make_mesh(dict(data=-1, fsdp=1, model=1)), dp)
    blocks = _as_processes(flat.devices_indices_map((32,)), lambda d: by_order[d.id] // 4)
    sharding.check_process_rows(blocks, 32, 2)  # devices 0-3 on process 0: rows 0..15
    interleaved = _as_processes(flat.devices_indices_map((32,)), lambda d: by_order[d.id] % 2)
    with pytest.raises(ValueError, match=r"Process 0's devices hold rows 0\.\.27 \(16 of them\).*feeds rows 0\.\.15"):
        sharding.check_process_rows(interleaved, 32, 2)
    # A model axis across the two processes: both hold every row, though each feeds half of them.
    tp = sharding.batch_sharding(sharding.make_mesh(dict(data=4, fsdp=1, model=2)), dp)
    across = _as_processes(tp.devices_indices_map((32,)), lambda d: by_order[d.id] % 2)
    with pytest.raises(ValueError, match=r"hold rows 0\.\.31 \(32 of them\)"):
        sharding.check_process_rows(across, 32, 2)
    within = _as_processes(tp.devices_indices_map((32,)), lambda d: by_order[d.id] // 4)
    sharding.check_process_rows(within, 32, 2)
