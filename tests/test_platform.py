"""Platform hooks: system-owned data, named RNG streams (exact resume with dropout and an augment
stream), parameter groups (frozen parameters keep no optimizer moments), weight decay by role,
`init_from` with subtree maps and key-listing errors, parameter-sized loading, best checkpoints."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import colearn_jax
from colearn_jax.train import loop
from colearn_jax.train import rng as rng_lib
from colearn_jax.train.checkpoint import list_steps
from colearn_jax.train.init_from import InitFromError, parse_map, plan
from colearn_jax.train.metrics import read_metrics
from colearn_jax.train.optimizer import make_optimizer, weight_decay_mask
from colearn_jax.train.program import TrainProgram
from tests import toy_system


def _toy(**train):
    c = toy_system.get_config()
    c.train.update(**train)
    return c


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("toy"))
    state = loop.train(_toy(), workdir)
    return workdir, jax.device_get(state)


def test_stream_keys_depend_on_seed_step_and_name():
    base = jax.random.PRNGKey(0)
    a, b = rng_lib.step_keys(base, 3, ("dropout", "augment")).values()
    assert not np.array_equal(jax.random.key_data(a) if a.dtype != jnp.uint32 else a, b)
    again = rng_lib.step_keys(base, 3, ("augment",))["augment"]
    np.testing.assert_array_equal(again, b)  # a stream's key does not depend on the other streams
    assert not np.array_equal(rng_lib.step_keys(base, 4, ("augment",))["augment"], b)
    keys = rng_lib.per_example_keys(b, 4)
    np.testing.assert_array_equal(keys[2], jax.random.fold_in(b, 2))  # row i depends only on (key, i)


def test_toy_system_trains_through_the_generic_loop(toy_run):
    workdir, state = toy_run
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert [r["step"] for r in rows if "eval/mse" in r] == [4, 8]
    assert jax.tree.leaves(state.model_state)  # BatchNorm statistics ride along
    # best/ keeps the lower mse (the metric says lower is better)
    evals = {r["step"]: r["eval/mse"] for r in rows if "eval/mse" in r}
    assert list_steps(os.path.join(workdir, "best")) == [min(evals, key=evals.get)]


def test_resume_with_dropout_and_augment_streams_is_exact(toy_run, tmp_path):
    _, full = toy_run
    workdir = str(tmp_path)

    def sigterm(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = loop.train(_toy(), workdir, hooks=[sigterm])
    assert int(stopped.step) == 3
    resumed = loop.train(_toy(), workdir)
    _same(jax.device_get(resumed.params), full.params)
    _same(jax.device_get(resumed.model_state), full.model_state)
    # and the streams really draw: other keys for the same parameters and batch give another loss
    c = _toy()
    program = TrainProgram.build(c)
    batch = program.place_batch(next(toy_system.make_train_data(c, colearn_jax.models.DataContext(seed=0))))
    _, a = program.step(program.init_state(), batch)
    _, b = program.step(program.init_state(), batch)
    _, other = program.step(program.init_state().replace(rng=jax.random.PRNGKey(123)), batch)
    assert float(a["loss"]) == float(b["loss"]) != float(other["loss"])


def test_weight_decay_by_shape_and_role():
    params = {
        "encoder": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
                    "attn": {"bias_k": jnp.ones((1, 1, 4)), "query": {"bias": jnp.ones((2, 2))}},
                    "ln": {"scale": jnp.ones(4)}},
        "position_embeddings": {"embedding": jnp.ones((8, 4))},
        "modality_embedding": jnp.ones((3, 4)),
        "token_embedding": {"embedding": jnp.ones((10, 4))},
        "logit_scale": jnp.ones(()),
    }
    mask = weight_decay_mask(params)
    assert mask["encoder"]["dense"]["kernel"] and mask["token_embedding"]["embedding"]
    assert not mask["encoder"]["dense"]["bias"] and not mask["encoder"]["attn"]["bias_k"]
    assert not mask["encoder"]["attn"]["query"]["bias"] and not mask["encoder"]["ln"]["scale"]
    assert not mask["position_embeddings"]["embedding"] and not mask["modality_embedding"]
    assert not mask["logit_scale"]


def _param_count(tree, arrays_only=False):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if not arrays_only or x.ndim)


def test_frozen_group_keeps_no_optimizer_state_and_does_not_move():
    c = _toy()
    c.optim.groups = [{"pattern": r"^fc/", "frozen": True}, {"pattern": r"^out/", "lr_mult": 0.5}]
    program = TrainProgram.build(c)
    state = program.init_state()
    n_fc = _param_count(state.params["fc"])
    n_all = _param_count(state.params)
    # AdamW keeps mu and nu: 2 per trainable parameter; frozen parameters have none (scalar step
    # counters aside).
    assert _param_count(state.opt_state, arrays_only=True) == 2 * (n_all - n_fc)
    free = TrainProgram.build(_toy()).init_state()
    assert _param_count(free.opt_state, arrays_only=True) == 2 * n_all
    batch = program.place_batch(next(toy_system.make_train_data(c, colearn_jax.models.DataContext(seed=0))))
    before = jax.device_get(state.params)
    for _ in range(3):
        state, metrics = program.step(state, batch)
    after = jax.device_get(state.params)
    _same(after["fc"], before["fc"])
    assert not np.allclose(after["out"]["kernel"], before["out"]["kernel"])


def test_lr_multiplier_scales_the_group_update():
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    c = _toy().optim
    c.update(name="sgd", momentum=0.0, warmup_steps=0, schedule="constant", weight_decay=0.0, lr=0.1)
    c.groups = [{"pattern": "^b$", "lr_mult": 0.25}]
    tx, _ = make_optimizer(c, 10)
    grads = {"a": jnp.ones(3), "b": jnp.ones(3)}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], -0.1)
    np.testing.assert_allclose(updates["b"], -0.025)


def test_init_from_map_plan_and_errors():
    src = {"params/vision/w": np.zeros((2, 3)), "params/vision/b": np.zeros(3), "params/text/w": np.zeros((4, 4))}
    dst = {"params/image/w": np.zeros((2, 3)), "params/image/b": np.zeros(3), "params/head/w": np.zeros(5)}
    assert parse_map("vision:image, text") == [("vision", "image"), ("text", "text")]
    wanted = plan(src, dst, [("vision", "image")])
    assert wanted == {"params/image/w": "params/vision/w", "params/image/b": "params/vision/b"}
    with pytest.raises(InitFromError) as e:
        plan(src, dst, [])
    msg = str(e.value)
    assert "missing from the checkpoint (3)" in msg and "params/head/w" in msg
    assert "unexpected (in the checkpoint, not in the model) (3)" in msg
    bad = dict(dst, **{"params/image/w": np.zeros((3, 3))})
    with pytest.raises(InitFromError, match=r"shape mismatch \(1\): params/image/w \(checkpoint \(2, 3\) vs model \(3, 3\)\)"):
        plan(src, bad, [("vision", "image")])
    with pytest.raises(InitFromError, match="the model has no subtree 'nothing'"):
        plan(src, dst, [("vision", "nothing")])


def test_init_from_a_run_restores_params_and_fresh_moments(toy_run, tmp_path):
    workdir, full = toy_run
    c = _toy(init_from=workdir, num_steps=1, eval_every=0, best_metric="")
    c.optim.lr = 1e-12  # one step barely moves: the parameters must be the pretrained ones
    state = loop.train(c, str(tmp_path))
    np.testing.assert_allclose(jax.device_get(state.params)["fc"]["kernel"], full.params["fc"]["kernel"], atol=1e-6)
    assert int(state.step) == 1  # a new run, not a resume of the source
    # a subtree map into a model whose other parts stay freshly initialised
    c = _toy(init_from=workdir, init_from_map="out", num_steps=1, eval_every=0, best_metric="")
    c.model.hidden = 16
    c.optim.lr = 1e-12
    state = loop.train(c, str(tmp_path / "mapped"))
    np.testing.assert_allclose(jax.device_get(state.params)["out"]["kernel"], full.params["out"]["kernel"], atol=1e-6)
    assert not np.allclose(jax.device_get(state.params)["fc"]["kernel"], full.params["fc"]["kernel"])


def test_init_from_shape_mismatch_names_the_keys(toy_run, tmp_path):
    workdir, _ = toy_run
    c = _toy(init_from=workdir)
    c.model.hidden = 12
    with pytest.raises(InitFromError, match=r"shape mismatch .*params/fc/kernel \(checkpoint \(8, 16\) vs model \(8, 12\)\)"):
        loop.train(c, str(tmp_path))


def test_load_reads_parameters_and_model_state_only(toy_run):
    workdir, full = toy_run
    model, variables, config = colearn_jax.load(workdir)
    restored_bytes = sum(x.nbytes for x in jax.tree.leaves(variables))
    param_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(full.params))
    state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(full.model_state))
    assert restored_bytes == param_bytes + state_bytes  # no optimizer moments
    _same(jax.device_get(variables["params"]), full.params)
    best_model, best_vars, _ = colearn_jax.load(workdir, which="best")
    assert set(best_vars) == {"params", "batch_stats"}


def test_generic_validation_then_system_validation(tmp_path):
    c = _toy()
    c.model.dropout = 1.5
    with pytest.raises(ValueError, match=r"config.model.dropout=1.5 must be in \[0, 1\)"):
        loop.train(c, str(tmp_path / "a"))
    c = _toy()
    c.optim.lr = -1e-3
    with pytest.raises(ValueError, match="config.optim.lr=-0.001 must be > 0"):
        loop.train(c, str(tmp_path / "b"))
    c = _toy()
    c.optim.groups = [{"pattern": "fc", "lr": 2.0}]
    with pytest.raises(ValueError, match=r"config.optim.groups\[0\].*unknown keys \['lr'\]"):
        loop.train(c, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")  # nothing created


def test_optax_tree_map_params_shards_grouped_state():
    """Optimizer-moment shardings come from the parameters' through optax.tree_map_params, also
    when parameter groups wrap the state in multi_transform's masked states."""
    c = _toy()
    c.sharding = "fsdp"
    c.optim.groups = [{"pattern": r"^out/", "lr_mult": 0.1}]
    program = TrainProgram.build(c)
    shardings = program.state_shardings
    mus = [s for s in jax.tree.leaves(shardings.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
    fc = [m.mu["fc"]["kernel"] for m in mus]
    fc = [s for s in fc if not isinstance(s, optax.MaskedNode)]
    assert len(fc) == 1 and fc[0].spec == shardings.params["fc"]["kernel"].spec
    assert fc[0].spec != jax.sharding.PartitionSpec()  # really sharded (fsdp over "embed")
