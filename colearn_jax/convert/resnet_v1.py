"""Import torchvision-layout ResNet state dicts into `colearn_jax.nn.resnet_v1.ResNetV1` (SimCLR's encoder).

    python -m colearn_jax.convert --source=torchvision_resnet --input=resnet50.pth --output=/tmp/r50
    python -m colearn_jax.convert --source=torchvision_resnet --input=r50_1x_sk0.pth --output=/tmp/simclr_r50 \
        --with_classifier          # keep `fc` as the fine-tuning classifier (system simclr_finetune)

Sources: torchvision's `resnet18/34/50/101/152` (any width multiplier; not the wide_resnet variants), and the PyTorch SimCLR
converters' output, which use the same layout (`conv1`, `bn1`, `layer{1-4}.{j}.conv{1-3}`,
`...downsample.{0,1}`) plus an `fc` head. Keys may sit under a prefix (`module.`, `encoder.`,
`backbone.`, ...): it is found from the `conv1.weight` key, or given with `--prefix`. Everything
else under the prefix must map (a stray key is an error); `fc.*` is dropped unless
`--with_classifier`, and keys outside the prefix (a projection head beside the encoder) are listed
and dropped.

The architecture is read from the shapes: basic or bottleneck blocks, stage depths (-> depth 18 ...
152 when standard), width multiplier (conv1's channels / 64) and the stem (7x7, or a 3x3 CIFAR stem).
Layouts: Conv2d [out, in, kh, kw] -> [kh, kw, in, out]; BatchNorm weight/bias -> scale/bias,
running_mean/var -> batch_stats mean/var (`num_batches_tracked` dropped); Linear [out, in] -> [in, out].

BatchNorm statistics: flax and torch use the same momentum (flax 0.9 on the old value = torch 0.1 on
the new one) and eps 1e-5, so converted running statistics give equal eval-mode features. A training
step updates them slightly differently: torch's running_var takes the *unbiased* batch variance
(x n/(n-1), n = examples x H x W per channel), flax's the biased one. Batch normalisation itself
(the forward) is identical; tests/test_convert_resnet_v1.py checks both.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from colearn_jax.convert.reading import ConversionError, StateDict
from colearn_jax.nn.resnet_v1 import DEPTHS

SOURCE = "torchvision_resnet"


def find_prefix(sd: Mapping[str, Any], prefix: str | None = None) -> str:
    """The key prefix of the ResNet (the part before `conv1.weight`)."""
    if prefix is not None:
        if f"{prefix}conv1.weight" not in sd:
            raise ConversionError(f"--prefix={prefix!r}: no {prefix}conv1.weight in the state dict.")
        return prefix
    stems = [k[: -len("conv1.weight")] for k in sd
             if k.endswith("conv1.weight") and not re.search(r"layer\d+\.\d+\.conv1\.weight$", k)]
    if len(stems) != 1:
        raise ConversionError(f"cannot find one ResNet stem (`<prefix>conv1.weight`) in the state dict; candidates "
                              f"{stems[:5]}. Pass --prefix.")
    return stems[0]


def architecture(sd: Mapping[str, Any], prefix: str = "") -> dict:
    """{block, stage_sizes, depth or None, width_multiplier, cifar_stem, num_classes or None} from the shapes."""
    stem = np.shape(sd[f"{prefix}conv1.weight"])
    if stem[1] != 3:
        raise ConversionError(f"{prefix}conv1.weight takes {stem[1]} input channels; only RGB ResNets convert.")
    if stem[2:] not in ((7, 7), (3, 3)):
        raise ConversionError(f"{prefix}conv1.weight is {stem[2]}x{stem[3]}: neither the 7x7 stem nor the 3x3 CIFAR stem.")
    stages = []
    for i in range(1, 5):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}layer{i}\.(\d+)\.", k))}
        if not blocks:
            break
        if blocks != set(range(len(blocks))):
            raise ConversionError(f"{prefix}layer{i} blocks are not numbered 0..n-1: {sorted(blocks)}.")
        stages.append(len(blocks))
    if not stages:
        raise ConversionError(f"no residual stages ({prefix}layer1.0.*) in the state dict.")
    block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in sd else "basic"
    depth = next((d for d, (b, s) in DEPTHS.items() if b == block and s == tuple(stages)), None)
    width = stem[0] / 64.0
    planes = np.shape(sd[f"{prefix}layer1.0.conv1.weight"])[0]
    if planes != stem[0]:
        raise ConversionError(f"{prefix}layer1.0 has {planes} planes but the stem {stem[0]} channels; only the "
                              "standard widths (planes = stem channels x 2^stage) convert.")
    fc = f"{prefix}fc.weight"
    return {"block": block, "stage_sizes": stages, "depth": depth, "width_multiplier": width,
            "cifar_stem": stem[2] == 3, "num_classes": int(np.shape(sd[fc])[0]) if fc in sd else None}


def encoder_variables(sd: Mapping[str, Any], arch: dict, prefix: str = "", with_classifier: bool = False
                      ) -> tuple[dict, dict, list[str]]:
    """(encoder params, encoder batch_stats, classifier params or {}); raises on any unmapped key."""
    take = StateDict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})

    def conv(name):
        return {"kernel": take(f"{name}.weight").transpose(2, 3, 1, 0)}

    def bn(name):
        take.mark_used([f"{name}.num_batches_tracked"])
        return ({"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")},
                {"mean": take(f"{name}.running_mean"), "var": take(f"{name}.running_var")})

    params, stats = {"conv1": conv("conv1")}, {}
    params["bn1"], stats["bn1"] = bn("bn1")
    convs = 3 if arch["block"] == "bottleneck" else 2
    for i, n in enumerate(arch["stage_sizes"], start=1):
        for j in range(n):
            src, dst = f"layer{i}.{j}", f"layer{i}_{j}"
            p, s = {}, {}
            for c in range(1, convs + 1):
                p[f"conv{c}"] = conv(f"{src}.conv{c}")
                p[f"bn{c}"], s[f"bn{c}"] = bn(f"{src}.bn{c}")
            if f"{src}.downsample.0.weight" in take:
                p["downsample_conv"] = conv(f"{src}.downsample.0")
                p["downsample_bn"], s["downsample_bn"] = bn(f"{src}.downsample.1")
            params[dst], stats[dst] = p, s
    classifier = {}
    if "fc.weight" in take:
        if with_classifier:
            classifier = {"kernel": take("fc.weight").T, "bias": take("fc.bias")}
        else:
            take.mark_used(["fc.weight", "fc.bias"])
    take.check_all_used(f"{SOURCE} (under prefix {prefix!r})", model="ResNetV1")
    return params, stats, classifier


def make_config(arch: dict, with_classifier: bool, image_size: int | None = None) -> ml_collections.ConfigDict:
    """A SimCLR config (no projection head) whose encoder is `arch`; `simclr_finetune` with the classifier."""
    from colearn_jax.configs import simclr  # noqa: PLC0415

    c = simclr.get_config("cifar10" if arch["cifar_stem"] else "resnet50_imagenet")
    c.unlock()
    e = c.model.encoder
    e.depth = arch["depth"] or 50
    e.stage_sizes = [] if arch["depth"] else list(arch["stage_sizes"])
    e.block = None if arch["depth"] else arch["block"]
    e.width_multiplier = arch["width_multiplier"]
    e.cifar_stem = arch["cifar_stem"]
    c.model.head.num_layers = 0  # torchvision checkpoints carry no projection head
    c.model.ft_proj_selector = 0
    if image_size:
        c.data.image_size = int(image_size)
    if with_classifier:
        if arch["num_classes"] is None:
            raise ConversionError("--with_classifier: the state dict has no fc.weight.")
        c.model.name = "simclr_finetune"
        c.eval.num_classes = arch["num_classes"]
        c.eval.update(linear_probe=False, knn=False)
        c.train.best_metric = "top1"
    c.lock()
    return c


def convert_state_dict(sd: Mapping[str, Any], *, with_classifier: bool = False, prefix: str | None = None,
                       image_size: int | None = None, check: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) from a torchvision-layout state dict (numpy arrays or torch tensors)."""
    prefix = find_prefix(sd, prefix)
    arch = architecture(sd, prefix)
    params, stats, classifier = encoder_variables(sd, arch, prefix, with_classifier)
    variables = {"params": {"encoder": params}, "batch_stats": {"encoder": stats}}
    if classifier:
        variables["params"]["classifier"] = classifier
    config = make_config(arch, with_classifier, image_size)
    if check:
        from colearn_jax.convert.writing import check_variables  # noqa: PLC0415

        check_variables(config, variables)
    return config, variables


def dropped_keys(sd: Mapping[str, Any], prefix: str) -> list[str]:
    """Keys outside the ResNet's prefix (e.g. a SimCLR projection head beside the encoder)."""
    return sorted(k for k in sd if not k.startswith(prefix))


def describe(config) -> str:
    e = config.model.encoder
    name = f"ResNet-{e.depth}" if not e.stage_sizes else f"ResNet({e.block}, {list(e.stage_sizes)})"
    extra = f", classifier {config.eval.num_classes} classes" if config.model.name == "simclr_finetune" else ""
    return f"{name} {e.width_multiplier:g}x{', CIFAR stem' if e.cifar_stem else ''}{extra}"
