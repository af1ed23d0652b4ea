"""ResNet v1.5 (SimCLR's encoder) and SimCLR's projection head: architecture against torchvision's
parameter counts, stems, logical axes on every parameter, zero-init residuals, head structure and
the uncentred last BN."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colearn_jax.nn.projection_head import ProjectionHead
from colearn_jax.nn.resnet_v1 import ResNetV1

TINY = dict(stage_sizes=(1, 1), block="basic", width_multiplier=0.125)


def _images(b, s, seed=0):
    return jnp.asarray(np.random.RandomState(seed).rand(b, s, s, 3).astype(np.float32))


def _abstract(model, size=64):
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jax.ShapeDtypeStruct((1, size, size, 3),
                                                                                                 jnp.float32))


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))


@pytest.mark.parametrize("depth", [18, 50])
def test_parameter_and_statistic_counts_equal_torchvision(depth):
    torchvision = pytest.importorskip("torchvision")
    ref = getattr(torchvision.models, f"resnet{depth}")()
    ref_params = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    ref_stats = sum(b.numel() for n, b in ref.named_buffers() if n.endswith(("running_mean", "running_var")))
    v = _abstract(ResNetV1(depth=depth))
    assert _count(v["params"]) == ref_params
    assert _count(v["batch_stats"]) == ref_stats


@pytest.mark.parametrize("depth,features", [(18, 512), (34, 512), (50, 2048), (101, 2048), (152, 2048)])
def test_depths_and_widths(depth, features):
    assert ResNetV1(depth=depth).num_features == features
    assert ResNetV1(depth=depth, width_multiplier=2).num_features == 2 * features
    params = _abstract(ResNetV1(depth=depth, width_multiplier=0.25), 32)["params"]
    n_blocks = sum(1 for k in params if k.startswith("layer"))
    assert n_blocks == {18: 8, 34: 16, 50: 16, 101: 33, 152: 50}[depth]


def test_stems_and_output_shapes():
    model = ResNetV1(**TINY)
    x = _images(2, 32)
    out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        model.init(jax.random.PRNGKey(0), x), x)
    assert out["features"].shape == (2, 16)
    assert out["feature_map"].shape == (2, 4, 4, 16)  # 7x7/2 conv + 3x3/2 pool, then one stride-2 stage
    cifar = ResNetV1(**TINY, cifar_stem=True)
    v = cifar.init(jax.random.PRNGKey(0), x)
    assert nn.unbox(v)["params"]["conv1"]["kernel"].shape == (3, 3, 3, 8)
    assert cifar.apply(v, x)["feature_map"].shape == (2, 16, 16, 16)  # no stride in the stem
    with pytest.raises(ValueError, match="depth=42"):
        _abstract(ResNetV1(depth=42))
    with pytest.raises(ValueError, match="block='wide'"):
        _abstract(ResNetV1(stage_sizes=(1,), block="wide"))


def test_every_parameter_has_logical_axes_and_residuals_start_at_zero():
    v = _abstract(ResNetV1(depth=50, width_multiplier=0.125))
    for path, leaf in jax.tree_util.tree_leaves_with_path(v["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, path
    assert v["params"]["conv1"]["kernel"].names == (None, None, "channels", "embed")
    real = nn.unbox(ResNetV1(depth=50, width_multiplier=0.125).init(jax.random.PRNGKey(0), _images(1, 32)))
    blk = real["params"]["layer2_0"]
    assert not np.any(np.asarray(blk["bn3"]["scale"])) and np.all(np.asarray(blk["bn2"]["scale"]) == 1)
    assert blk["conv2"]["kernel"].shape[-1] == blk["conv1"]["kernel"].shape[-1]  # stride in the 3x3 (v1.5)
    assert "downsample_conv" in blk and "downsample_conv" not in real["params"]["layer2_1"]


@pytest.mark.parametrize("num_layers", [2, 3])
def test_projection_head_structure(num_layers):
    head = ProjectionHead(num_layers=num_layers, out_dim=8)
    h = jnp.asarray(np.random.RandomState(0).randn(32, 24).astype(np.float32)) * 3 + 1
    v = head.init(jax.random.PRNGKey(0), h)
    params = nn.unbox(v)["params"]
    for j in range(num_layers - 1):
        assert params[f"layer_{j}"]["kernel"].shape == (24, 24) and "bias" not in params[f"layer_{j}"]
        assert set(params[f"bn_{j}"]) == {"scale", "bias"}
    last = num_layers - 1
    assert params[f"layer_{last}"]["kernel"].shape == (24, 8)
    assert set(params[f"bn_{last}"]) == {"scale"}  # no centering on the output layer
    np.testing.assert_allclose(np.std(params["layer_0"]["kernel"]), 0.01, rtol=0.15)
    stages, _ = head.apply(v, h, train=True, mutable=["batch_stats"])
    assert len(stages) == num_layers + 1 and stages[0] is h
    z = np.asarray(stages[-1])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)  # batch statistics, gamma 1, no beta
    for hidden in stages[1:-1]:
        assert np.all(np.asarray(hidden) >= 0)  # ReLU on hidden layers...
    assert np.any(z < 0)  # ...not on the output


def test_no_head_passes_the_representation_through():
    h = jnp.ones((4, 6))
    stages = ProjectionHead(num_layers=0).apply({}, h)
    assert len(stages) == 1 and stages[0] is h


@pytest.mark.parametrize("depth,size", [(50, 224), (18, 64)])
def test_analytic_flops_equal_torch_flop_counter(depth, size):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from colearn_jax import perf  # noqa: PLC0415
    from colearn_jax.configs.simclr import get_config  # noqa: PLC0415

    ref = getattr(torchvision.models, f"resnet{depth}")().eval()
    ref.fc = torch.nn.Identity()
    with FlopCounterMode(display=False) as counter:
        ref(torch.zeros(1, 3, size, size))
    encoder = get_config("resnet50_imagenet").model.encoder
    encoder.unlock()
    encoder.depth = depth
    assert perf.resnet_v1_forward_flops(encoder, size) == counter.get_total_flops()
