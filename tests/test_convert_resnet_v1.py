"""torchvision-layout ResNets -> ResNetV1: eval-mode features and logits within 1e-4 of torchvision's (random
weights and statistics), the same train-mode forward and BatchNorm running statistics (torch's running_var
uses the unbiased batch variance: converted to flax's biased convention before comparing), the CIFAR stem
of the PyTorch SimCLR ports, prefixes and stray keys, and the command line."""
import copy

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import colearn_jax  # noqa: E402
from colearn_jax.convert import resnet_v1 as conv  # noqa: E402
from colearn_jax.convert.__main__ import main as convert_main  # noqa: E402
from colearn_jax.convert.reading import ConversionError  # noqa: E402
from colearn_jax.models import get_system  # noqa: E402

TOL = 1e-4


def _randomise(model, seed=0, size=64):
    """Random BN affine parameters, and running statistics calibrated on random images (so every
    activation stays O(1) through the depth) - each converted tensor then matters."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            m.momentum = None  # cumulative average: the statistics of the calibration batch
        model.train()
        model(torch.rand((8, 3, size, size), generator=g))
        for m in bns:
            m.momentum = 0.1
            m.num_batches_tracked.zero_()
    return model.eval()


def _sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _images(b, s, seed=0):
    return np.random.default_rng(seed).random((b, s, s, 3)).astype(np.float32)


def _torch_features(model, x):
    fc, model.fc = model.fc, torch.nn.Identity()
    try:
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    finally:
        model.fc = fc


def _ours(config, variables):
    return get_system(config.model.name).build_model(config), variables


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return _randomise(torchvision.models.resnet50()).eval()


def test_resnet50_eval_features_and_logits_match_torchvision(resnet50):
    x = _images(2, 64)
    config, variables = conv.convert_state_dict(_sd(resnet50), with_classifier=True)
    assert config.model.encoder.depth == 50 and not config.model.encoder.cifar_stem
    assert config.model.name == "simclr_finetune" and config.eval.num_classes == 1000
    model = get_system(config.model.name).build_model(config)
    out = jax.jit(lambda v, im: model.apply(v, {"image": im}))(variables, x)
    ref = _torch_features(resnet50, x)
    assert np.max(np.abs(ref)) > 0.1
    np.testing.assert_allclose(np.asarray(out["features"]), ref, atol=TOL, rtol=TOL)
    # Logits sum 2048 products more: both float32 implementations sit ~1.5e-4 from float64 there, so
    # compare with torch in float64 and allow twice torch's own float32 error.
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    logits32 = resnet50(xt).detach().numpy()
    logits64 = copy.deepcopy(resnet50).double()(xt.double()).detach().numpy()
    ours_err = np.max(np.abs(np.asarray(out["logits"]) - logits64))
    assert ours_err <= 2 * np.max(np.abs(logits32 - logits64)) + 1e-5, ours_err


def test_train_mode_forward_and_running_statistics_match_torch(resnet50):
    """One train-mode forward in both: the same outputs (batch statistics) and the same running means; torch
    updates running_var with the unbiased batch variance, flax with the biased one - the test converts."""
    model_t = _randomise(torchvision.models.resnet50(), seed=1)
    config, variables = conv.convert_state_dict(_sd(model_t))
    counts = {}  # BN module name -> examples per channel (n) in its batch statistics
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: counts.__setitem__(name, inp[0].numel() //
                                                                                          inp[0].shape[1]))
             for name, m in model_t.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = _images(4, 64, seed=2)
    old = _sd(model_t)
    model64 = copy.deepcopy(model_t).double().train()
    model_t.train()
    ref = _torch_features(model_t, x)
    for h in hooks:
        h.remove()
    new = _sd(model_t)
    model = get_system(config.model.name).build_model(config)
    out, state = jax.jit(lambda v, im: model.apply(v, {"image": im}, train=True, mutable=["batch_stats"]))(variables, x)
    # Batch statistics over few values per channel (16 in the last stage) amplify float32 rounding: compare
    # with torch in float64 and allow twice torch's own float32 error.
    model64.fc = torch.nn.Identity()
    ref64 = model64(torch.from_numpy(x.transpose(0, 3, 1, 2)).double()).detach().numpy()
    ours_err = np.max(np.abs(np.asarray(out["features"]) - ref64))
    assert ours_err <= 2 * np.max(np.abs(ref - ref64)) + 1e-5, ours_err
    _, stats, _ = conv.encoder_variables(new, conv.architecture(new))
    ours = jax.tree.map(np.asarray, state["batch_stats"]["encoder"])
    n_checked, smallest = 0, min(counts.values())
    for name, n in counts.items():
        path = name.split(".")
        if len(path) == 1:
            node_ours, node_ref = ours[path[0]], stats[path[0]]
        else:
            blk = f"{path[0]}_{path[1]}"
            leaf = path[2] if path[2] != "downsample" else "downsample_bn"
            node_ours, node_ref = ours[blk][leaf], stats[blk][leaf]
        np.testing.assert_allclose(node_ours["mean"], node_ref["mean"], atol=TOL, rtol=TOL)
        torch_old = old[f"{name}.running_var"]
        unbiased = (node_ref["var"] - 0.9 * torch_old) / 0.1
        expected = 0.9 * torch_old + 0.1 * unbiased * (n - 1) / n  # the biased batch variance
        np.testing.assert_allclose(node_ours["var"], expected, atol=TOL, rtol=TOL)
        if n == smallest:  # few values per channel: torch's unbiased update differs visibly
            assert not np.allclose(node_ours["var"], node_ref["var"], atol=TOL, rtol=TOL)
        n_checked += 1
    assert n_checked == 53  # every BatchNorm of ResNet-50


def _cifar_resnet18():
    """A PyTorch SimCLR port's CIFAR ResNet-18: torchvision's with a 3x3 stride-1 stem and no max pool."""
    torch.manual_seed(3)
    m = torchvision.models.resnet18()
    m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    return _randomise(m, seed=3).eval()


def test_cifar_stem_prefix_and_dropped_head(tmp_path):
    model_t = _cifar_resnet18()
    sd = {f"module.encoder.{k}": v for k, v in _sd(model_t).items()}
    sd["module.projector.0.weight"] = np.zeros((8, 512), np.float32)  # a SimCLR head beside the encoder
    path = str(tmp_path / "simclr_r18.pth")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    assert convert_main(["--source=torchvision_resnet", f"--input={path}", f"--output={tmp_path / 'out'}",
                         "--image_size=32"]) == 0
    model, variables, config = colearn_jax.load(str(tmp_path / "out"))
    e = config.model.encoder
    assert (e.depth, e.cifar_stem, e.width_multiplier, config.model.head.num_layers) == (18, True, 1.0, 0)
    x = _images(3, 32, seed=4)
    ours = np.asarray(jax.jit(lambda v, im: model.apply(v, im, method=model.encode))(variables, x))
    np.testing.assert_allclose(ours, _torch_features(model_t, x), atol=TOL, rtol=TOL)
    with pytest.raises(ConversionError, match="layer9.0.odd"):
        bad = {**_sd(model_t), "layer9.0.odd": np.zeros(3, np.float32)}
        conv.convert_state_dict(bad)
    with pytest.raises(ConversionError, match="no fc.weight"):
        no_fc = {k: v for k, v in _sd(model_t).items() if not k.startswith("fc.")}
        conv.convert_state_dict(no_fc, with_classifier=True)


def test_nonstandard_depths_and_basic_blocks_are_read_from_shapes():
    m = torchvision.models.resnet._resnet(torchvision.models.resnet.BasicBlock, [1, 2, 1, 1], None, False)
    config, _ = conv.convert_state_dict(_sd(m))
    e = config.model.encoder
    assert list(e.stage_sizes) == [1, 2, 1, 1] and e.block == "basic" and not e.cifar_stem
