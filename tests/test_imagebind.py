"""ImageBind system: the multi-modality loss and gradients on the 8-device mesh (fsdp, all_gather)
equal one device's; CLIP towers inflated into ImageBind embed images identically and stay frozen
through training steps while the other towers move; the training step lowers for `huge`-shaped
towers under fsdp (tests/test_imagebind_huge in experiments/imagebind_memory.py for the full size)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colearn_jax.train.program import TrainProgram
from tests.helpers import load_config

MODS = ["vision", "text", "audio", "imu"]  # every stem kind that differs: 3-D conv, text, fbank+conv, IMU linear


def _config(sharding="dp", mesh=None, gather="auto", mods=MODS):
    c = load_config("imagebind.py:tiny")
    c.unlock()
    c.model.modalities = list(mods)
    c.loss.pairs = [m for m in mods if m != "vision"]
    c.loss.gather = gather
    c.sharding = sharding
    c.mesh.update(mesh or dict(data=1, fsdp=1, model=1))
    c.optim.update(name="sgd", lr=0.05, momentum=0.9, warmup_steps=0)
    return c


def _batch(config, seed=0):
    rng = np.random.RandomState(seed)
    b, d = config.data.batch_size, config.data
    text = rng.randint(1, 200, size=(b, d.context_length)).astype(np.int32)
    eot = rng.randint(3, d.context_length, size=b)
    for i, e in enumerate(eot):
        text[i, e] = 300
        text[i, e + 1:] = 0
    full = {"image": rng.randn(b, d.image_size, d.image_size, 3).astype(np.float32), "text": text,
            "audio": (rng.randn(b, int(d.audio_seconds * 16000)) * 3000).astype(np.int16),
            "depth": rng.rand(b, 32, 32, 1).astype(np.float32), "thermal": rng.randint(0, 255, (b, 32, 32, 1), np.uint8),
            "imu": rng.randn(b, 6, d.imu_length).astype(np.float16)}
    keys = {"vision": "image"}
    return {keys.get(m, m): full[keys.get(m, m)] for m in config.model.modalities}


def _loss_grads(config, devices=None):
    program = TrainProgram.build(config, devices=devices)
    state = program.init_state()
    loss, grads = program.grads(state, program.place_batch(_batch(config)))
    return float(loss), jax.device_get(grads)


def test_sharded_loss_and_grads_equal_single_device():
    loss1, g1 = _loss_grads(_config(), devices=jax.devices()[:1])
    loss8, g8 = _loss_grads(_config("fsdp", dict(data=2, fsdp=4, model=1), gather="all_gather"))
    assert np.isfinite(loss1) and loss1 > 1.0  # four InfoNCE terms at init: ~log(32)
    np.testing.assert_allclose(loss8, loss1, rtol=2e-5)
    for path in ("audio", "imu", "vision", "text"):  # every tower got a gradient, and the same one
        assert np.max(np.abs(jax.tree.leaves(g1[path])[0])) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * np.max(np.abs(b)) + 1e-7), g8, g1)


def test_inflated_clip_towers_match_and_stay_frozen(tmp_path):
    """CLIP (configs/clip.py:tiny-like sizes matching ImageBind tiny's vision/text towers) -> inflate_clip
    -> init_from + frozen groups: image embeddings equal CLIP's before training (up to LayerNorm eps), and
    after 2 SGD steps vision/text are bit-identical while the audio tower moved."""
    from colearn_jax.convert.writing import save_checkpoint
    from colearn_jax.models import get_system
    from colearn_jax.models.imagebind_system import clip_config_for, inflate_clip

    ib = _config(mods=["vision", "text", "audio"])
    clip_cfg = load_config("clip.py:tiny")
    clip_cfg.unlock()
    clip_config_for(ib, clip_cfg)
    clip_sys = get_system("clip")
    clip_model = clip_sys.build_model(clip_cfg)
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), clip_sys.example_batch(clip_cfg, 2))
    import flax.linen as nn
    clip_vars = nn.unbox(clip_model.init(jax.random.PRNGKey(3), batch))
    save_checkpoint(clip_cfg, clip_vars, str(tmp_path / "clip"))
    inflate_clip(str(tmp_path / "clip"), ib, str(tmp_path / "ib"))

    ib.train.init_from = str(tmp_path / "ib")
    ib.train.init_from_map = "vision,text,text_logit_scale"
    ib.optim.groups = [{"pattern": r"^(vision|text)/|^text_logit_scale$", "frozen": True}]
    from colearn_jax.train.init_from import apply_pretrained, restore_pretrained
    from colearn_jax.train.state import TrainState, reinit_opt_state

    program = TrainProgram.build(ib, devices=jax.devices()[:1])
    state = program.init_state()  # then what train/loop.py does with config.train.init_from:
    loaded, _, _ = restore_pretrained(ib.train.init_from, program.abstract_state.variables(), ib.train.init_from_map)
    assert any(k.startswith("params/vision/") for k in loaded) and "params/text_logit_scale" in loaded
    state = TrainState.from_parts(apply_pretrained(state.variables(), loaded), state.progress())
    state = reinit_opt_state(state, program.tx, program.state_shardings)
    images = np.random.RandomState(0).randn(4, 16, 16, 3).astype(np.float32)
    ours = program.model.apply({"params": state.params}, {"image": images})["vision_embeds"]
    theirs = clip_model.apply(clip_vars, images, method=clip_model.encode_image)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-3)  # LN eps 1e-6 vs 1e-5 only
    before = jax.device_get(state.params)
    for seed in (1, 2):
        state, _ = program.step(state, program.place_batch(_batch(ib, seed)))
    after = jax.device_get(state.params)
    for frozen in ("vision", "text", "text_logit_scale"):
        jax.tree.map(np.testing.assert_array_equal, after[frozen], before[frozen])
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(after["audio"]), jax.tree.leaves(before["audio"])))
    assert moved > 1e-4


def test_tiny_learns_on_digit_modalities():
    """60 AdamW steps on real digit_modalities batches (image, audio via on-device fbank, depth): the
    loss falls (collapse would sit at ln 32), and the evaluator reports every metric it describes in [0, 1].
    (Cross-modal metrics stay near chance after 60 tiny steps; emergent accuracy needs the digits preset.)"""
    from colearn_jax.models import DataContext, get_system

    c = load_config("imagebind.py:tiny")
    c.unlock()
    c.model.modalities = ["vision", "audio", "depth"]
    c.loss.pairs = ["audio", "depth"]
    c.optim.update(lr=1e-2, warmup_steps=5, weight_decay=0.0)
    c.train.update(num_steps=60, best_metric="audio2depth_class_p1")
    c.eval.update(zeroshot_modalities=[], retrieval_pairs=[["audio", "depth"]], arithmetic_pairs=[["audio", "depth"]])
    system = get_system("imagebind")
    program = TrainProgram.build(c, devices=jax.devices()[:1])
    state = program.init_state()
    data = system.make_train_data(c, DataContext(seed=0))
    losses = []
    for _ in range(60):
        batch = next(data)
        batch.pop("label")
        state, metrics = program.step(state, program.place_batch(batch))
        losses.append(float(metrics["loss"]))
    print("loss", losses[0], "->", np.mean(losses[-5:]))
    assert np.mean(losses[-5:]) < 0.88 * np.mean(losses[:3])  # collapse (uniform logits, ln 32) is 0.92x
    evaluator = system.make_evaluator(c, program.mesh, program.rules)
    metrics = evaluator(program.model, {"params": state.params})
    assert set(metrics) == set(system.describe_metrics(c)) and all(0 <= v <= 1 for v in metrics.values())


def _unit(rng, b, d):
    x = rng.randn(b, d).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_masked_loss_is_the_loss_of_the_present_rows_on_one_device_and_eight():
    """clip_loss with a row mask (pairs absent from some datasets of a mixture) equals the plain loss of
    the present rows alone, value and gradients (absent rows get zero gradient); all_gather and ring on
    the 8-device mesh (the ring carries the mask with its travelling column blocks) equal it too."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from colearn_jax.losses.contrastive import clip_loss

    rng = np.random.RandomState(0)
    img, other = _unit(rng, 16, 8), _unit(rng, 16, 8)
    mask = np.ones(16, bool)
    mask[[1, 4, 5, 11, 12, 15]] = False
    scale = jnp.float32(np.log(10.0))

    def masked(i, o, **kw):
        return clip_loss(i, o, scale, mask=jnp.asarray(mask), **kw)[0]

    def present(i, o):
        return clip_loss(i[mask], o[mask], scale)[0]

    value, grads = jax.value_and_grad(masked, argnums=(0, 1))(img, other)
    ref, ref_grads = jax.value_and_grad(present, argnums=(0, 1))(img, other)
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g)[mask], np.asarray(rg)[mask], rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(g)[~mask] == 0)
    assert abs(float(value) - float(clip_loss(img, other, scale)[0])) > 1e-3  # the mask changes the loss

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    for gather in ("all_gather", "ring"):
        kw = dict(gather=gather, mesh=mesh, batch_axes=("data",))
        with jax.set_mesh(mesh):
            (v8, acc8), g8 = jax.jit(jax.value_and_grad(
                lambda i, o: (lambda r: (r[0], r[1]["i2t_acc"]))(clip_loss(i, o, scale, mask=put(mask), **kw)),
                argnums=(0, 1), has_aux=True))(put(img), put(other))
        np.testing.assert_allclose(v8, value, rtol=1e-6, err_msg=gather)
        np.testing.assert_allclose(acc8, clip_loss(img[mask], other[mask], scale)[1]["i2t_acc"], err_msg=gather)
        for g, rg in zip(g8, grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(rg), rtol=1e-5, atol=1e-7, err_msg=gather)


def test_mixture_of_datasets_that_each_give_some_modalities():
    """The paper's setting: each dataset pairs images with only some modalities. Members list theirs in
    `modalities`; their rows carry zeros and present_<m>=False for the rest, and the objective's loss for
    a pair is the loss of the rows that have it. Config errors name the problem."""
    from colearn_jax.losses.contrastive import clip_loss
    from colearn_jax.models import DataContext, get_system
    from colearn_jax.models.imagebind_system import make_objective

    c = load_config("imagebind.py:tiny")
    c.unlock()
    c.model.modalities = ["vision", "audio", "depth"]
    c.loss.pairs = ["audio", "depth"]
    c.data.mixture = [{"name": "digit_modalities", "weight": 1.0, "modalities": ["vision", "audio"]},
                      {"name": "digit_modalities", "weight": 1.0, "modalities": ["vision", "depth"]}]
    system = get_system("imagebind")
    system.validate_config(c)
    batch = next(system.make_train_data(c, DataContext(seed=0)))
    has_audio, has_depth = batch["present_audio"], batch["present_depth"]
    assert has_audio.dtype == bool and np.all(has_audio != has_depth)  # each row from exactly one member
    assert 0 < has_audio.sum() < len(has_audio)
    assert not np.any(batch["audio"][~has_audio]) and np.any(batch["audio"][has_audio])
    assert not np.any(batch["depth"][~has_depth]) and np.any(batch["depth"][has_depth])

    rng = np.random.RandomState(1)
    b, scale = len(has_audio), jnp.float32(np.log(5.0))
    outputs = {f"{m}_embeds": jnp.asarray(_unit(rng, b, 16)) for m in c.model.modalities}
    outputs.update({f"{m}_log_scale": scale for m in ("audio", "depth")})
    _, metrics = make_objective(c)(outputs, batch, None, 0)
    for m, rows in (("audio", has_audio), ("depth", has_depth)):
        expected = clip_loss(outputs["vision_embeds"][rows], outputs[f"{m}_embeds"][rows], scale)[0]
        np.testing.assert_allclose(metrics[f"{m}_loss"], expected, rtol=1e-6)

    bad = c.copy_and_resolve_references()
    bad.data.mixture = [{"name": "digit_modalities", "weight": 1.0, "modalities": ["vision", "audio"]}]
    with pytest.raises(ValueError, match=r"no dataset of config.data gives"):
        system.validate_config(bad)
    bad = c.copy_and_resolve_references()
    bad.data.mixture = [{"name": "digit_modalities", "weight": 1.0, "modalities": ["audio", "depth"]}]
    with pytest.raises(ValueError, match=r"mixture\[0\].modalities.*must include 'vision'"):
        system.validate_config(bad)


def test_example_batch_takes_digit_modalities_formats_without_tfds():
    """`imagebind_system.example_batch` reads the audio rate and IMU channels from modules that import no
    TFDS (benchmarks run the train step where TFDS is absent): the numbers `digit_modalities` writes."""
    from colearn_jax.data import audio, digit_modalities, modality_io  # noqa: PLC0415
    from colearn_jax.models import imagebind_system  # noqa: PLC0415

    assert (audio.SAMPLE_RATE, len(modality_io.IMU_COLUMNS)) == (digit_modalities.SAMPLE_RATE,
                                                                 digit_modalities.IMU_CHANNELS)
    c = load_config("imagebind.py:digits")
    spec = imagebind_system.example_batch(c, 2)
    assert spec["audio"].shape == (2, digit_modalities.AUDIO_SAMPLES)
    assert spec["imu"].shape == (2, digit_modalities.IMU_CHANNELS, digit_modalities.IMU_LENGTH)
