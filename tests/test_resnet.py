"""ModifiedResNet (CLIP RN towers): shapes, BatchNorm state, sharding, and parity with open_clip."""
import copy
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

try:  # open_clip >= 2.23 moved the class out of open_clip.model
    from open_clip.modified_resnet import ModifiedResNet as TorchModifiedResNet
except ImportError:  # pragma: no cover
    from open_clip.model import ModifiedResNet as TorchModifiedResNet

from colearn_jax.convert.resnet import modified_resnet_config_from_torch, modified_resnet_from_torch
from colearn_jax.nn.resnet import ModifiedResNet

TINY = dict(layers=(1, 1, 1, 1), output_dim=32, num_heads=2, image_size=64, width=16)


def _images(batch, size, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32))


@pytest.fixture(scope="module")
def tiny():
    model = ModifiedResNet(**TINY)
    # rbg keys: the jitted init compiles in a fraction of threefry's time on CPU.
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), _images(2, 64))
    return model, variables


@functools.cache
def _train_apply(model):
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))


def test_shapes_tree_and_axes(tiny):
    model, boxed = tiny
    variables = nn.unbox(boxed)
    out = jax.jit(model.apply)(variables, _images(2, 64))
    chex.assert_shape(out["embedding"], (2, 32))
    chex.assert_shape(out["tokens"], (2, (64 // 32) ** 2, 16 * 32))
    chex.assert_tree_all_finite(out)

    params, stats = variables["params"], variables["batch_stats"]
    assert set(variables) == {"params", "batch_stats"}
    assert sorted(k for k in params if k.startswith("layer")) == ["layer1_0", "layer2_0", "layer3_0", "layer4_0"]
    chex.assert_shape(params["conv1"]["kernel"], (3, 3, 3, 8))
    chex.assert_shape(params["conv3"]["kernel"], (3, 3, 8, 16))
    blk = params["layer2_0"]
    chex.assert_shape(blk["conv1"]["kernel"], (1, 1, 64, 32))
    chex.assert_shape(blk["conv2"]["kernel"], (3, 3, 32, 32))
    chex.assert_shape(blk["conv3"]["kernel"], (1, 1, 32, 128))
    chex.assert_shape(blk["downsample_conv"]["kernel"], (1, 1, 64, 128))
    chex.assert_shape(stats["layer2_0"]["bn3"]["var"], (128,))
    attn = params["attnpool"]["attn"]
    chex.assert_shape(params["attnpool"]["positional_embedding"], (5, 512))
    chex.assert_shape(attn["query"]["kernel"], (512, 2, 256))
    chex.assert_shape(attn["key"]["bias"], (2, 256))
    chex.assert_shape(attn["out"]["kernel"], (2, 256, 32))
    # OpenAI init: every bottleneck's last BN starts at zero scale (each block starts as identity).
    for name, blk in params.items():
        if name.startswith("layer"):
            np.testing.assert_array_equal(blk["bn3"]["scale"], 0.0)
    assert not np.all(np.asarray(params["bn3"]["scale"]) == 0)  # the stem's bn3 is an ordinary BN
    # Every parameter carries logical axis names.
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    specs = nn.get_partition_spec(boxed["params"])
    assert specs["layer1_0"]["conv2"]["kernel"] == P(None, None, "channels", "embed")
    assert specs["layer1_0"]["bn1"]["scale"] == P("embed")


def test_batch_stats_train_vs_eval(tiny):
    model, boxed = tiny
    variables = nn.unbox(boxed)
    x = _images(8, 64, seed=2)
    out, upd = _train_apply(model)(variables, x)
    chex.assert_trees_all_equal_structs(upd["batch_stats"], variables["batch_stats"])
    for path, old, new in zip(
        jax.tree_util.tree_leaves_with_path(variables["batch_stats"]),
        jax.tree.leaves(variables["batch_stats"]),
        jax.tree.leaves(upd["batch_stats"]),
    ):
        assert not np.allclose(old, new), f"batch stat {jax.tree_util.keystr(path[0])} not updated in train mode"
    # Momentum 0.9: new = 0.9 * old + 0.1 * batch statistic; the stem's bn1 sees conv1(x) directly.
    h = jax.lax.conv_general_dilated(
        x, variables["params"]["conv1"]["kernel"], (2, 2), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(upd["batch_stats"]["bn1"]["mean"], 0.1 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["bn1"]["var"], 0.9 + 0.1 * h.var((0, 1, 2)), rtol=1e-4)

    out_eval, same = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(variables, x)
    chex.assert_trees_all_equal(same["batch_stats"], variables["batch_stats"])
    assert not np.allclose(out["embedding"], out_eval["embedding"])


def test_wrong_image_size_raises(tiny):
    model, boxed = tiny
    with pytest.raises(ValueError, match="feature grid"):
        jax.eval_shape(model.apply, nn.unbox(boxed), _images(1, 96))


def test_sharded_train_step_equals_unsharded(tiny):
    """FSDP-style placement on 8 devices; BN statistics over the sharded global batch are global."""
    model, boxed = tiny
    variables = nn.unbox(boxed)
    x = _images(8, 64, seed=2)
    ref_out, ref_stats = _train_apply(model)(variables, x)

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "model"))
    rules = (("batch", ("data", "fsdp")), ("embed", ("data", "fsdp")), ("channels", ("data", "fsdp")))
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    placed = jax.device_put(variables, param_shardings)
    assert placed["params"]["layer4_0"]["conv3"]["kernel"].sharding.spec == P(None, None, None, ("data", "fsdp"))
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    sharded_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out, stats = sharded_apply(placed, xs)
    assert out["embedding"].sharding.spec[0] == ("data", "fsdp")
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(stats, ref_stats, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- parity with open_clip


def _random_torch_resnet(layers, output_dim, heads, image_size, width, seed=0):
    torch.manual_seed(seed)
    net = TorchModifiedResNet(list(layers), output_dim, heads, image_size=image_size, width=width)
    with torch.no_grad():  # non-trivial BN (incl. the zero-initialised bn3) and running statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize(
    "layers,width,image_size,heads,output_dim",
    [((1, 1, 1, 1), 16, 64, 2, 32), ((2, 1, 1, 2), 8, 96, 4, 24)],
)
def test_parity_with_open_clip(layers, width, image_size, heads, output_dim):
    net = _random_torch_resnet(layers, output_dim, heads, image_size, width)
    state = {f"visual.{k}": v.detach().numpy().copy() for k, v in net.state_dict().items()}
    cfg = modified_resnet_config_from_torch(state, num_heads=heads)
    assert cfg == dict(layers=layers, output_dim=output_dim, num_heads=heads, image_size=image_size, width=width)
    variables = modified_resnet_from_torch(state, num_heads=heads)
    model = ModifiedResNet(**cfg)

    x = np.random.RandomState(3).randn(3, image_size, image_size, 3).astype(np.float32)
    init = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x)))
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, init)

    # Also capture the stem's first conv and the first stride-2 block: the final embedding is only
    # weakly sensitive to a one-pixel shift of the stride-2 sampling grid (flax "SAME" vs torch).
    watched = ("conv1", "layer2_0")
    out, inter = jax.jit(
        lambda v, x: model.apply(
            v, x, capture_intermediates=lambda m, _: m.name in watched and len(m.scope.path) == 1,
            mutable=["intermediates"],
        )
    )(variables, jnp.asarray(x))
    with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        ref_conv1 = net.conv1(xt).permute(0, 2, 3, 1).numpy()
        ref_layer2 = net.layer2(net.layer1(net.stem(xt)))
        feats = net.layer4(net.layer3(ref_layer2))
        ref_layer2 = ref_layer2.permute(0, 2, 3, 1).numpy()
        ref_tokens = feats.flatten(2).transpose(1, 2).numpy()
        ref = net(xt).numpy()
    np.testing.assert_allclose(inter["intermediates"]["conv1"]["__call__"][0], ref_conv1, atol=1e-5)
    np.testing.assert_allclose(inter["intermediates"]["layer2_0"]["__call__"][0], ref_layer2, atol=1e-5)
    err = float(np.max(np.abs(np.asarray(out["embedding"]) - ref)))
    print(f"parity layers={layers} width={width} image={image_size}: max abs diff {err:.3g}")
    assert err <= 1e-4
    np.testing.assert_allclose(out["tokens"], ref_tokens, atol=1e-4, rtol=1e-4)

    # Train mode: batch statistics in the forward pass, running means with torch's momentum 0.1.
    # (torch updates running_var with the unbiased variance; flax uses the biased one.)
    net_train = copy.deepcopy(net).train()
    with torch.no_grad():
        ref_train = net_train(xt).numpy()
    out_train, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    np.testing.assert_allclose(out_train["embedding"], ref_train, atol=1e-4)
    np.testing.assert_allclose(
        upd["batch_stats"]["layer1_0"]["bn2"]["mean"], net_train.layer1[0].bn2.running_mean.numpy(), atol=1e-5
    )
