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
