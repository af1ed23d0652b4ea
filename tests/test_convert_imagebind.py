"""facebookresearch/ImageBind -> colearn_jax's ImageBind: a small reference model's state dict converts, and
every modality's output (vision, text, audio with 2 clips averaged, depth, thermal, IMU; the reference's
scaled, normalised embeddings) is within 1e-4 of the reference's; through the command line (safetensors
input, --scan) it loads with `colearn_jax.load`; the released imagebind_huge shapes give the `huge`
preset's towers; wrong / missing keys fail naming the key. No torch needed.

How the fixtures were made (the reference is not installable; nothing of it is committed):
    fetch github:facebookresearch/ImageBind (53680b0); git archive HEAD imagebind | tar -x -C /tmp/ib_ref
    : > /tmp/ib_ref/imagebind/__init__.py        # it imports the data module (pytorchvideo)
    pip install --target /work/.ib_ref_deps iopath portalocker
    PYTHONPATH=/tmp/ib_ref:/work/.ib_ref_deps python ...   with torch 2.14.1, timm 1.0.31:
  torch.manual_seed(0); imagebind.models.imagebind_model.ImageBindModel(out_embed_dim=12,
  vision_embed_dim=16, vision_num_blocks=2, vision_num_heads=2, text 16/2/4, audio 16/2/2, depth 8/1/2,
  thermal 12/1/3, imu 16/2/4 (embed_dim/num_blocks/num_heads), every other argument as released).eval();
  then in its state dict: 1-D `*weight` (LayerNorm scales) = 1 + 0.25 N(0,1), 1-D `*bias` = 0.1 N(0,1),
  every float rounded to a float16 value (stored as float16: exact); token-embedding rows no test token
  uses zeroed (so the file compresses); text `log_logit_scale` = log 30. Inputs (numpy default_rng(0)),
  values on a 1/64 grid, float16: vision [2,3,224,224] U(-2,2) at 56 px upsampled x4 (nearest); text
  [2,77] <sot>=49406, 5 / 11 ids in [1,49400), <eot>=49407, zeros; audio [2,2,1,128,204] N(0,1) at 64x102
  upsampled x2; depth, thermal [2,1,224,224] N(0,1) at 56 px x4; imu [2,6,2000] N(0,1) at 1000 samples x2.
  outputs = model({m: input}) (float32). np.savez_compressed: the state dict (reference key names) to
  fixtures/imagebind_small.npz, `input_<m>` / `output_<m>` to fixtures/imagebind_small_io.npz.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
import pytest

import colearn_jax
from colearn_jax.configs.imagebind import get_config
from colearn_jax.convert import imagebind as conv
from colearn_jax.convert.__main__ import main as convert_main
from colearn_jax.convert.reading import ConversionError
from colearn_jax.models import get_system

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HEADS = {"vision": 2, "text": 4, "audio": 2, "depth": 2, "thermal": 3, "imu": 4}
TOL = 1e-4


@pytest.fixture(scope="module")
def state_dict():
    with np.load(os.path.join(FIXTURES, "imagebind_small.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference():
    with np.load(os.path.join(FIXTURES, "imagebind_small_io.npz")) as f:
        io = {k: f[k] for k in f.files}
    x = {m: io[f"input_{m}"] for m in ("vision", "text", "audio", "depth", "thermal", "imu")}
    inputs = {  # the reference's channels-first images -> ours channels-last
        "vision": x["vision"].astype(np.float32).transpose(0, 2, 3, 1), "text": x["text"].astype(np.int32),
        "audio": x["audio"].astype(np.float32), "depth": x["depth"].astype(np.float32).transpose(0, 2, 3, 1),
        "thermal": x["thermal"].astype(np.float32).transpose(0, 2, 3, 1), "imu": x["imu"].astype(np.float32)}
    return inputs, {m: io[f"output_{m}"] for m in inputs}


def _max_diffs(model, variables, inputs, expected, modalities=None):
    fn = jax.jit(lambda v, m, x: model.apply(v, m, x, method=lambda mod, m, x: mod.encode(m, x)), static_argnums=1)
    return {m: float(np.max(np.abs(np.asarray(fn(variables, m, inputs[m])) - expected[m])))
            for m in (modalities or inputs)}


def test_every_modality_matches_the_reference(state_dict, reference):
    inputs, expected = reference
    config, variables = conv.convert_state_dict(state_dict, HEADS)
    assert config.model.modalities == ["vision", "text", "audio", "depth", "thermal", "imu"]
    t = config.model.towers
    assert (t.vision.patch, t.vision.input_size, t.audio.stride, t.imu.patch, t.imu.input_size) == \
        ([2, 14, 14], [224, 224], [10, 10], [8], [6, 2000])
    assert (t.depth.width, t.thermal.heads, config.model.embed_dim) == (8, 3, 12)
    assert t.audio.logit_scale == pytest.approx(20.0) and t.imu.head_dropout == 0.5
    assert float(np.exp(variables["params"]["text_logit_scale"])) == pytest.approx(30.0)
    model = get_system("imagebind").build_model(config)
    diffs = _max_diffs(model, variables, inputs, expected)
    print("max |ours - reference| per modality:", diffs)
    assert all(np.max(np.abs(expected[m])) > 0.3 for m in expected)
    assert max(diffs.values()) < TOL, diffs
    # The check sees the head split: 2 text heads instead of the reference's 4 are far off.
    config2, variables2 = conv.convert_state_dict(state_dict, dict(HEADS, text=2))
    wrong = _max_diffs(get_system("imagebind").build_model(config2), variables2, inputs, expected, ["text"])
    assert wrong["text"] > 100 * TOL


def test_command_line_scan_and_load(state_dict, reference, tmp_path):
    from safetensors.numpy import save_file

    inputs, expected = reference
    path = str(tmp_path / "imagebind_small.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
    out = str(tmp_path / "out")
    heads = ",".join(f"{m}:{n}" for m, n in HEADS.items() if m != "vision")
    assert convert_main(["--source=imagebind", f"--input={path}", f"--output={out}", "--scan",
                         f"--heads={heads}", "--vision_heads=2"]) == 0
    model, variables, config = colearn_jax.load(out)
    assert config.model.scan and config.model.name == "imagebind"
    assert "layers" in variables["params"]["audio"]["transformer"]
    diffs = _max_diffs(model, variables, inputs, expected)
    assert max(diffs.values()) < TOL, diffs
    # Without head counts for non-released widths: exit code 2, the message names the tower and the flag.
    assert convert_main(["--source=imagebind", f"--input={path}", f"--output={tmp_path / 'o2'}"]) == 2


def _mutated(sd, drop=(), add=None):
    out = {k: v for k, v in sd.items() if k not in drop}
    out.update(add or {})
    return out


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: _mutated(sd, drop=["modality_trunks.audio.blocks.1.mlp.fc2.bias"]),
     "modality_trunks.audio.blocks.1.mlp.fc2.bias"),
    (lambda sd: _mutated(sd, drop=["modality_preprocessors.depth.depth_stem.norm_layer.weight"]),
     "modality_preprocessors.depth.depth_stem.norm_layer.weight"),
    (lambda sd: _mutated(sd, add={"modality_trunks.imu.blocks.0.attn.q_norm.weight": np.ones(16, np.float32)}),
     "modality_trunks.imu.blocks.0.attn.q_norm.weight"),
    (lambda sd: _mutated(sd, add={"modality_trunks.audio.pre_transformer_layer.0.weight": np.ones(16, np.float32)}),
     "modality_trunks.audio.pre_transformer_layer.0.weight"),
    (lambda sd: _mutated(sd, add={"modality_heads.depth.2.weight": np.zeros((10, 8), np.float32)}),
     "modality_heads.depth.2.weight"),
    (lambda sd: _mutated(sd, add={"modality_preprocessors.text.pos_embed": np.zeros((1, 77, 8), np.float32)}),
     "modality_preprocessors.text.pos_embed"),
    (lambda sd: {k: v for k, v in sd.items() if ".vision." not in k}, "modality_trunks.vision"),
    (lambda sd: {"visual.conv1.weight": np.zeros((4, 3, 2, 2), np.float32)}, "not an ImageBind state dict"),
])
def test_wrong_or_missing_keys_are_named(state_dict, mutate, message):
    with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
        conv.convert_state_dict(mutate(state_dict), HEADS)


def test_architecture_options_are_checked(state_dict):
    with pytest.raises(ConversionError, match=r"modality_trunks\.depth: width 8 .*--heads=depth:N"):
        conv.imagebind_architecture(state_dict, {m: n for m, n in HEADS.items() if m != "depth"})
    with pytest.raises(ConversionError, match=r"modality_trunks\.thermal: 5 heads do not divide width 12"):
        conv.imagebind_architecture(state_dict, dict(HEADS, thermal=5))
    with pytest.raises(ConversionError, match=r"pos_embedding_helper\.pos_embed: 228 audio patch positions.*"
                                              r"--audio_stride"):
        conv.imagebind_architecture(state_dict, HEADS, audio_stride=16)
    with pytest.raises(ConversionError, match="unknown modalities"):
        conv.imagebind_architecture(state_dict, dict(HEADS, video=2))
    with pytest.raises(ConversionError, match="vision:16"):
        conv.parse_heads("vision=16")
    assert conv.parse_heads("vision:16, text:8") == {"vision": 16, "text": 8}


def _huge_shaped(state_dict):
    """The released imagebind_huge's keys and shapes (zero-stride arrays: no memory), from the small
    fixture's: widths scaled to the released ones, blocks repeated to the released depths."""
    small = {m: (conv.RELEASED[m][0], n) for m, n in {"vision": 16, "text": 16, "audio": 16, "depth": 8,
                                                     "thermal": 12, "imu": 16}.items()}
    layers = {"vision": 32, "text": 24, "audio": 12, "depth": 12, "thermal": 12, "imu": 6}
    scales = {"text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}
    out = {}
    for key, value in state_dict.items():
        m = key.split(".")[1]
        big, w = small[m]
        if key.endswith("log_logit_scale"):
            out[key] = np.float32(math.log(scales[m]))
            continue
        if f".{conv.HEAD_PROJ[m]}.weight" in key and key.startswith(conv.HEAD):
            shape = (1024, big)
        elif key.startswith(conv.STEM.get(m, "-")) and key.endswith("proj.weight") or key.endswith("proj.1.weight"):
            shape = (big,) + value.shape[1:]  # stems: only the output channels scale
        else:
            shape = tuple({w: big, 3 * w: 3 * big, 4 * w: 4 * big}.get(d, d) if d not in (77, 49408) else d
                          for d in value.shape)
        if ".blocks.0." in key:
            for i in range(layers[m]):
                out[key.replace(".blocks.0.", f".blocks.{i}.")] = np.broadcast_to(np.float32(0), shape)
        elif ".blocks." not in key:
            out[key] = np.broadcast_to(np.float32(0), shape)
    return out


def test_released_shapes_give_the_huge_preset(state_dict):
    arch = conv.imagebind_architecture(_huge_shaped(state_dict))  # head counts: the released ones
    config = conv.imagebind_config(arch, scan=True)
    get_system("imagebind").validate_config(config)
    huge = get_config("huge")
    assert config.model.embed_dim == huge.model.embed_dim == 1024
    for m in huge.model.modalities:
        ours, want = config.model.towers[m], huge.model.towers[m]
        for key in want:
            if isinstance(want[key], float):
                assert ours[key] == pytest.approx(want[key], rel=1e-6), (m, key)
            else:
                assert ours[key] == want[key], (m, key, ours[key], want[key])
    assert config.data.image_size == 224 and config.data.audio_mel_bins == 128 and config.data.imu_length == 2000
