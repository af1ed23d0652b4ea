"""The SimCLR system: two on-device views per image, NT-Xent normalisations, LARS exclusions through the
default decay mask, config checks and presets, and - on the 8-device mesh - global BatchNorm: loss,
gradients, parameters and BN statistics after two steps equal one device's under every preset and
gather mode."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colearn_jax import config_checks, sharding
from colearn_jax.configs.simclr import learning_rate
from colearn_jax.models import get_system
from colearn_jax.models.simclr_system import make_batch_transform, make_objective, split_views
from colearn_jax.train.optimizer import make_optimizer, weight_decay_mask
from colearn_jax.train.program import TrainProgram
from colearn_jax.train.rng import step_keys
from tests.helpers import load_config
from tests.test_sharding import _assert_equal_runs, _two_steps


def _config(variant="tiny", **overrides):
    c = load_config(f"simclr.py:{variant}")
    c.unlock()
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def synthetic_images(config, batch_size=None, seed=0):
    rng = np.random.RandomState(seed)
    b, s = batch_size or config.data.batch_size, config.data.image_size
    # Smooth random images (a coarse grid upsampled), so crops and colour changes matter.
    coarse = rng.rand(b, 4, 4, 3)
    img = np.repeat(np.repeat(coarse, s // 4, axis=1), s // 4, axis=2)
    return {"image": (255 * img).astype(np.uint8)}


def test_batch_transform_makes_two_interleaved_views():
    c = _config()
    batch = synthetic_images(c, 4)
    keys = step_keys(jax.random.PRNGKey(0), 3, ("augment",))
    views = np.asarray(make_batch_transform(c)(batch, keys, 3)["image"])
    assert views.shape == (8, 16, 16, 3) and views.dtype == np.float32
    assert 0.0 <= views.min() and views.max() <= 1.0
    assert not np.allclose(views[0], views[1])  # two independent views of image 0
    plain = _config(**{"augment.crop": False, "augment.color": False, "augment.flip": False})
    ident = np.asarray(make_batch_transform(plain)(batch, keys, 3)["image"])
    np.testing.assert_allclose(ident[0::2], batch["image"] / 255.0, atol=1e-6)  # row 2i + v: view v of i
    np.testing.assert_allclose(ident[1::2], batch["image"] / 255.0, atol=1e-6)
    colour_only = _config(**{"augment.crop": False, "augment.flip": False})
    cv = np.asarray(make_batch_transform(colour_only)(batch, keys, 3)["image"])
    # Without crop or flip a view keeps its image's layout: the coarse grid's cells stay constant.
    assert np.allclose(cv[:, :4, :4].std(axis=(1, 2)), 0, atol=1e-5)


def test_normalisations_and_view_split():
    z = jnp.asarray(np.random.RandomState(0).randn(8, 5).astype(np.float32))
    z1, z2 = split_views(z)
    np.testing.assert_array_equal(z1, z[0::2])
    np.testing.assert_array_equal(z2, z[1::2])
    ref, _ = make_objective(_config())({"proj": z}, {}, {}, 0)
    half, _ = make_objective(_config(**{"loss.normalization": "mean_2n"}))({"proj": z}, {}, {}, 0)
    np.testing.assert_allclose(float(half), 0.5 * float(ref), rtol=1e-6)
    # "mean_2n" is the mean over the 2N anchors of -log softmax at the positive (the usual port's form).
    tau = _config().loss.temperature
    zn = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=1, keepdims=True)
    order = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # [view 1 of all; view 2 of all]
    s = zn[order] @ zn[order].T / tau
    np.fill_diagonal(s, -np.inf)
    pos = np.concatenate([np.arange(4, 8), np.arange(0, 4)])
    lse = np.log(np.exp(s).sum(1))
    np.testing.assert_allclose(float(half), np.mean(lse - s[np.arange(8), pos]), rtol=1e-5)


def _abstract_params(config):
    model = get_system(config.model.name).build_model(config)
    spec = {"image": jax.ShapeDtypeStruct((2, config.data.image_size, config.data.image_size, 3), jnp.float32)}
    return nn.unbox(jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b, train=False), spec))["params"]


def test_default_decay_mask_excludes_batchnorm_and_biases_from_decay_and_lars():
    """SimCLR's LARS skips weight decay and the trust ratio on BatchNorm parameters and biases (the
    reference's `exclude_from_weight_decay`); the platform's default mask does it by shape and role."""
    c = _config(**{"optim.weight_decay": 0.1, "optim.warmup_steps": 0})
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), _abstract_params(c))
    mask = weight_decay_mask(params)
    assert mask["encoder"]["conv1"]["kernel"] and mask["head"]["layer_0"]["kernel"]
    assert not mask["encoder"]["bn1"]["scale"] and not mask["encoder"]["bn1"]["bias"]
    assert not mask["head"]["bn_0"]["bias"] and not mask["head"]["bn_1"]["scale"]
    tx, schedule = make_optimizer(c.optim, c.train.num_steps)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.2, p.dtype), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = float(schedule(0))
    assert lr > 0
    # BN scale: plain -lr * g (no decay, no trust ratio).
    np.testing.assert_allclose(np.asarray(updates["encoder"]["bn1"]["scale"]), -lr * 0.2, rtol=1e-6)
    # A conv kernel: -lr * eeta * ||w|| / ||g + wd w|| * (g + wd w).
    w, g = params["encoder"]["conv1"]["kernel"], grads["encoder"]["conv1"]["kernel"]
    d = g + 0.1 * w
    expect = -lr * c.optim.trust_coefficient * jnp.linalg.norm(w) / jnp.linalg.norm(d) * d
    np.testing.assert_allclose(np.asarray(updates["encoder"]["conv1"]["kernel"]), np.asarray(expect), rtol=1e-5)


def test_learning_rate_helper_and_presets():
    assert learning_rate(4096) == pytest.approx(4.8)
    assert learning_rate(4096, 0.075, "sqrt") == pytest.approx(4.8)
    assert learning_rate(512, 1.0) == pytest.approx(2.0)
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, model=1))
    rules = sharding.get_rules("dp")
    for preset in ("tiny", "digit_scenes", "cifar10", "resnet50_imagenet", "digit_scenes,finetune"):
        c = load_config(f"simclr.py:{preset}")
        if c.train.init_from_map:
            with pytest.raises(ValueError, match="config.train.init_from is empty"):  # fine-tuning needs weights
                config_checks.validate(c, get_system(c.model.name), mesh, rules)
            c.unlock()
            c.train.init_from = "/pretrained/run"
        config_checks.validate(c, get_system(c.model.name), mesh, rules)
    r50 = load_config("simclr.py:resnet50_imagenet")
    assert r50.optim.lr == pytest.approx(4.8) and r50.loss.temperature == 0.1 and r50.data.batch_size == 4096
    assert r50.optim.warmup_steps == round(10 * 1_281_167 / 4096) and r50.optim.weight_decay == 1e-6
    cifar = load_config("simclr.py:cifar10")
    assert cifar.model.encoder.cifar_stem and cifar.loss.temperature == 0.5 and cifar.optim.weight_decay == 1e-4


@pytest.mark.parametrize("key,value,match", [
    ("model.ft_proj_selector", 5, "config.model.ft_proj_selector=5"),
    ("loss.normalization", "sum", "config.loss.normalization='sum'"),
    ("loss.temperature", 0.0, "config.loss.temperature=0.0"),
    ("model.encoder.depth", 42, "config.model.encoder.depth=42"),
    ("augment.crop_scale", (0.5, 0.2), "config.augment.crop_scale"),
    ("loss.gather", "tree", "config.loss.gather='tree'"),
    ("model.encoder.kind", "convnext", "config.model.encoder.kind='convnext'"),
    ("augment.object_box_key", "", "config.augment.object_box_key=''"),
    ("augment.segmentation_key", "", "config.augment.segmentation_key=''"),
])
def test_config_errors_name_the_key(key, value, match):
    c = _config(**{key: value})
    if key == "augment.object_box_key":
        c.augment.object_crop = True
    if key == "augment.segmentation_key":
        c.augment.background_swap = True
    if key == "model.encoder.depth":
        c.model.encoder.stage_sizes = []
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        TrainProgram.build(c)


def _sharded_config(preset, mesh_cfg, gather="auto"):
    c = _config(**{"sharding": preset, "loss.gather": gather})
    c.mesh.update(mesh_cfg)
    c.optim.update(name="sgd", lr=0.05, momentum=0.9, warmup_steps=0)  # lr > 0 from the first step
    return c


@pytest.fixture(scope="module")
def reference():
    return _two_steps(_sharded_config("dp", dict(data=1, fsdp=1, model=1)), devices=jax.devices()[:1],
                      make_batch=synthetic_images)


@pytest.mark.parametrize("preset,mesh_cfg,gather", [
    ("dp", dict(data=8, fsdp=1, model=1), "auto"),
    ("fsdp", dict(data=2, fsdp=4, model=1), "all_gather"),
    ("fsdp_tp", dict(data=2, fsdp=2, model=2), "ring"),
])
def test_global_batchnorm_and_ntxent_sharded_equal_single_device(preset, mesh_cfg, gather, reference):
    """Two augmented views per image on device, BN over all 2N views of the global batch, NT-Xent over the
    global batch: the 8-device run's loss, gradients, parameters and BN statistics equal one device's."""
    assert jax.tree.leaves(reference["model_state"])  # there are batch statistics to compare
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(reference["params"]),
                                                    jax.tree.leaves(reference["init"]))]
    assert np.median(moved) > 1e-4  # two real updates
    run = _two_steps(_sharded_config(preset, mesh_cfg, gather), make_batch=synthetic_images)
    _assert_equal_runs(run, reference)


def test_object_aware_views_come_from_the_boxes_the_pipeline_carries():
    """augment.object_crop: the train pipeline carries each image's boxes, and every view is a crop around
    the first one. Scenes with one bright square each: a view that covers the square keeps its pixels."""
    from colearn_jax.models.simclr_system import example_batch, make_train_data  # noqa: PLC0415
    from colearn_jax.models import DataContext  # noqa: PLC0415

    c = _config(**{"augment.object_crop": True, "augment.color": False, "augment.flip": False,
                   "augment.crop_scale": (0.3, 0.5)})
    assert example_batch(c, 2)["boxes"].shape == (2, 1, 4)
    batch = next(iter(make_train_data(c, DataContext(seed=0))))
    assert batch["boxes"].shape == (c.data.batch_size, 1, 4) and batch["boxes"].dtype == np.float32
    assert (batch["boxes"][:, 0, 2] > batch["boxes"][:, 0, 0]).all()  # x2 > x1: real boxes

    s = 32
    images = np.zeros((4, s, s, 3), np.uint8)
    images[:, 4:10, 20:26] = 255  # the object: rows 4-9, columns 20-25
    boxes = np.tile(np.array([[[20 / s, 4 / s, 26 / s, 10 / s]]], np.float32), (4, 1, 1))
    keys = step_keys(jax.random.PRNGKey(0), 0, ("augment",))
    views = np.asarray(make_batch_transform(c)({"image": images, "boxes": boxes}, keys, 0)["image"])
    assert views.shape == (8, s, s, 3)
    assert (views.reshape(8, -1).max(axis=1) > 0.9).all()  # the object is in every view
    unaware = np.asarray(make_batch_transform(_config(**{"augment.color": False, "augment.flip": False,
                                                         "augment.crop_scale": (0.3, 0.5)}))(
        {"image": images}, keys, 0)["image"])
    assert (unaware.reshape(8, -1).max(axis=1) < 0.5).any()  # plain crops miss it sometimes


def test_background_swaps_use_the_segmentation_the_pipeline_carries():
    """augment.background_swap: the pipeline carries the per-pixel instance map resized with the image, and
    each view shows its own digit's pixels on two different other images' backgrounds."""
    from colearn_jax.models.simclr_system import example_batch, make_train_data, swapped_backgrounds  # noqa: PLC0415
    from colearn_jax.data import augment  # noqa: PLC0415
    from colearn_jax.models import DataContext  # noqa: PLC0415

    c = _config(**{"augment.background_swap": True})
    assert example_batch(c, 2)["segmentation"].shape == (2, 16, 16, 1)
    batch = next(iter(make_train_data(c, DataContext(seed=0))))
    seg = batch["segmentation"]
    assert seg.shape == (c.data.batch_size, 16, 16, 1) and seg.dtype == np.uint8
    assert set(np.unique(seg).tolist()) == {0, 1}  # one digit per `single` image, resized 64 -> 16 nearest
    ink = batch["image"].astype(np.float32).max(-1)
    assert ink[seg[..., 0] > 0].mean() > ink[seg[..., 0] == 0].mean() + 60  # the segment is the bright digit

    images = jnp.asarray(batch["image"], jnp.float32) / 255.0
    fg = jnp.asarray(seg[..., 0] > 0)
    pairs = np.asarray(swapped_backgrounds(images, fg, jax.random.PRNGKey(3)))
    n = images.shape[0]
    assert pairs.shape == (2 * n, 16, 16, 3)
    fg_np = np.asarray(fg)
    for i in range(n):
        np.testing.assert_allclose(pairs[2 * i][fg_np[i]], np.asarray(images[i])[fg_np[i]])
        np.testing.assert_allclose(pairs[2 * i + 1][fg_np[i]], np.asarray(images[i])[fg_np[i]])
    plates = np.asarray(jax.vmap(augment.erase)(images, fg))  # each image with its digit erased
    backs = [np.nonzero([np.allclose(pairs[2 * i + v][~fg_np[i]], plates[j][~fg_np[i]], atol=1e-6)
                         for j in range(n)])[0].tolist() for i in range(n) for v in range(2)]
    assert all(len(b) == 1 for b in backs), backs  # the rest of each view is exactly one other image's plate
    partners = np.asarray([b[0] for b in backs]).reshape(n, 2)
    assert (partners != np.arange(n)[:, None]).all() and (partners[:, 0] != partners[:, 1]).all()
    keys = step_keys(jax.random.PRNGKey(0), 0, ("augment",))
    transform = jax.jit(make_batch_transform(c))
    inputs = {"image": batch["image"], "segmentation": seg}
    views = transform(inputs, keys, 0)["image"]
    assert views.shape == (2 * n, 16, 16, 3)
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, model=1))  # rows on 8 devices: the same views
    sharded = jax.device_put(inputs, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    np.testing.assert_allclose(np.asarray(transform(sharded, keys, 0)["image"]), np.asarray(views), atol=1e-6)


def test_vit_encoder_option():
    """model.encoder.kind="vit": a VisionTransformer (conv stem, mean-pooled) as SimCLR's encoder."""
    c = _config(**{"model.encoder.kind": "vit"})
    c.model.encoder.vit.update(patch_size=8, width=16, layers=1, heads=2)
    model = get_system("simclr").build_model(c)
    batch = {"image": jnp.asarray(synthetic_images(c, 4)["image"])}
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), batch))
    out = model.apply(variables, batch, train=False)
    assert out["features"].shape == (4, 16) and out["proj"].shape == (4, c.model.head.out_dim)
    assert "vit" in variables["params"]["encoder"]
    flat = jax.tree_util.tree_leaves_with_path(variables["params"]["encoder"])
    assert any("stem_conv0" in jax.tree_util.keystr(p) for p, _ in flat)  # the conv stem
