"""ImageBind checkpoints (Girdhar et al. 2023, "ImageBind: One Embedding Space To Bind Them All";
facebookresearch/ImageBind's `imagebind_huge.pth`) -> colearn_jax's ImageBind (models/imagebind.py).

    python -m colearn_jax.convert --source=imagebind --input=imagebind_huge.pth --output=/tmp/imagebind_huge [--scan]

    arch = imagebind_architecture(state_dict, heads={"vision": 16, ...})   # sizes from the shapes
    variables = imagebind_variables(state_dict, arch)                     # the parameter tree
    config = imagebind_config(arch, scan=False)                           # configs/imagebind.py:huge layout

The reference's state-dict layout (`ImageBindModel`, one entry per modality m of vision, text, audio,
depth, thermal, imu; any subset holding vision converts):
  modality_preprocessors.m.   stem: vision `rgbt_stem.proj.1.weight` (Conv3d [w, 3, T, p, p], after the
                              image is repeated to T frames), audio / thermal `rgbt_stem.proj.weight`, depth
                              `depth_stem.proj.weight` (bias-free Conv2d [w, 1, k, k]) and IMU
                              `imu_stem.proj.weight` (bias-free Linear [w, 6 * k]), each non-image stem
                              with `*_stem.norm_layer` (LayerNorm); `cls_token` [1, 1, w]; positions
                              `pos_embedding_helper.pos_embed` [1, 1 + patches, w] (IMU and text: `pos_embed`);
                              text `token_embedding.weight` and the causal `mask` buffer.
  modality_trunks.m.          `blocks.i.{norm_1, attn (nn.MultiheadAttention: in_proj_*, out_proj.*,
                              bias_k / bias_v for all but vision and text), norm_2, mlp.fc1, mlp.fc2}`;
                              vision's `pre_transformer_layer.0` (ln_pre).
  modality_heads.m.           LayerNorm `0`, then the bias-free projection `2` (IMU `3`, after its dropout;
                              text `proj.0` / `proj.1`, applied at the end-of-text token).
  modality_postprocessors.m.  `1.log_logit_scale`: text's learned logit scale, the others' fixed buffers
                              (audio 20, depth 5, thermal 10, IMU 5); vision has none.
Widths, layers, MLP ratios, patch kernels, input sizes (from the positions), the vocabulary, the joint
space and the scales come from the state dict. Not in it: the head counts (`heads=`, --heads; default
the released imagebind_huge counts where the width is the released one), the audio stride and
log-mel size (`audio_stride=` 10, `audio_mel_bins=` 128, `audio_frames=` 204 as released, checked
against the number of audio positions), and the training-only drop-path / dropout rates (the released
ones, from configs/imagebind.py:huge).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections
import numpy as np

from colearn_jax.convert.clip_architecture import mlp_ratio
from colearn_jax.convert.clip_weights import stack_layers
from colearn_jax.convert.reading import ConversionError, StateDict, count_layers
from colearn_jax.models.imagebind import MODALITIES

PRE, TRUNK, HEAD, POST = "modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors"
# imagebind_huge: modality -> (width, heads); the head count is in no weight shape.
RELEASED = {"vision": (1280, 16), "text": (1024, 16), "audio": (768, 12), "depth": (384, 8),
            "thermal": (768, 12), "imu": (512, 8)}
AUDIO_STRIDE, AUDIO_MEL_BINS, AUDIO_FRAMES = 10, 128, 204
IMU_CHANNELS = 6
STEM = {"vision": f"{PRE}.vision.rgbt_stem.proj.1", "audio": f"{PRE}.audio.rgbt_stem",
        "depth": f"{PRE}.depth.depth_stem", "thermal": f"{PRE}.thermal.rgbt_stem", "imu": f"{PRE}.imu.imu_stem"}
HEAD_PROJ = {"vision": "2", "text": "proj.1", "audio": "2", "depth": "2", "thermal": "2", "imu": "3"}
HEAD_LN = {m: ("proj.0" if m == "text" else "0") for m in MODALITIES}


def is_imagebind(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(f"{TRUNK}.") for k in sd)


def present_modalities(sd: Mapping[str, Any]) -> list[str]:
    found = {k.split(".")[1] for k in sd if k.startswith(f"{TRUNK}.")}
    unknown = sorted(found - set(MODALITIES))
    if unknown:
        raise ConversionError(f"{TRUNK}.{unknown[0]}.*: unknown modality {unknown[0]!r} (known: {list(MODALITIES)}).")
    mods = [m for m in MODALITIES if m in found]
    if "vision" not in mods:
        raise ConversionError(f"no {TRUNK}.vision.* keys: colearn_jax's ImageBind needs the vision tower "
                              f"(found {mods}).")
    return mods


def _positions_key(m: str) -> str:
    return f"{PRE}.{m}.pos_embed" if m in ("text", "imu") else f"{PRE}.{m}.pos_embedding_helper.pos_embed"


def _heads(m: str, width: int, heads: Mapping[str, int] | None) -> int:
    given = (heads or {}).get(m)
    if given is None:
        released_width, released_heads = RELEASED[m]
        if width != released_width:
            raise ConversionError(
                f"{TRUNK}.{m}: width {width} is not the released imagebind_huge width {released_width}, and no "
                f"weight shape reveals the head count: give it (heads={{{m!r}: N}}, --heads={m}:N).")
        given = released_heads
    if given <= 0 or width % given:
        raise ConversionError(f"{TRUNK}.{m}: {given} heads do not divide width {width} (--heads={m}:N).")
    return int(given)


def _square_grid(key: str, patches: int) -> int:
    g = math.isqrt(patches)
    if g * g != patches:
        raise ConversionError(f"{key}: {patches} patch positions are not a square grid (one frame of square "
                              "patches is what colearn_jax's ImageBind builds).")
    return g


def _tower_architecture(keys: StateDict, m: str, heads, audio_stride, audio_mel_bins, audio_frames) -> dict:
    trunk = f"{TRUNK}.{m}.blocks"
    layers = count_layers(keys.sd, rf"{TRUNK}\.{m}\.blocks\.(\d+)\.")
    if layers == 0:
        raise ConversionError(f"no {trunk}.<i>.* keys: the {m} trunk has no blocks.")
    width = keys.shape(f"{trunk}.0.attn.out_proj.weight")[0]
    arch = dict(width=width, layers=layers, heads=_heads(m, width, heads),
                mlp_ratio=mlp_ratio(keys.shape(f"{trunk}.0.mlp.fc1.weight")[0], width),
                add_bias_kv=f"{trunk}.0.attn.bias_k" in keys)
    for i in range(layers):
        if (f"{trunk}.{i}.attn.bias_k" in keys) != arch["add_bias_kv"]:
            raise ConversionError(f"{trunk}.{i}.attn.bias_k: present in some {m} blocks but not in others.")
    pos_key = _positions_key(m)
    positions = keys.shape(pos_key)
    if len(positions) != 3 or positions[0] != 1 or positions[2] != width:
        raise ConversionError(f"{pos_key}: shape {positions}, expected (1, tokens, {width}).")
    n = positions[1]
    if m == "text":
        vocab, w = keys.shape(f"{PRE}.text.token_embedding.weight")
        if w != width:
            raise ConversionError(f"{PRE}.text.token_embedding.weight: width {w}, the text trunk's is {width}.")
        return dict(arch, vocab_size=vocab, context_length=n)
    stem_key = f"{STEM[m]}.weight" if m == "vision" else f"{STEM[m]}.proj.weight"
    stem = keys.shape(stem_key)
    if stem[0] != width:
        raise ConversionError(f"{stem_key}: {stem[0]} output channels, the {m} trunk's width is {width}.")
    patches = n - 1  # one class token
    if m == "vision":
        if len(stem) != 5 or stem[1] != 3 or stem[3] != stem[4]:
            raise ConversionError(f"{stem_key}: shape {stem}, expected a Conv3d [w, 3, T, p, p].")
        side = _square_grid(pos_key, patches) * stem[3]
        return dict(arch, patch=[stem[2], stem[3], stem[4]], stride=None, input_size=[side, side], in_channels=3)
    if m == "imu":
        if len(stem) != 2 or stem[1] % IMU_CHANNELS:
            raise ConversionError(f"{stem_key}: shape {stem}, expected a Linear [w, {IMU_CHANNELS} * samples].")
        k = stem[1] // IMU_CHANNELS
        return dict(arch, patch=[k], stride=None, input_size=[IMU_CHANNELS, patches * k], in_channels=1)
    if len(stem) != 4 or stem[1] != 1:
        raise ConversionError(f"{stem_key}: shape {stem}, expected a 1-channel Conv2d [w, 1, kh, kw].")
    kh, kw = stem[2], stem[3]
    if m == "audio":
        s = int(audio_stride)
        grid = ((audio_mel_bins - kh) // s + 1) * ((audio_frames - kw) // s + 1)
        if grid != patches:
            raise ConversionError(
                f"{pos_key}: {patches} audio patch positions, but a {kh}x{kw} stem with stride {s} over "
                f"{audio_mel_bins} mel bins x {audio_frames} frames makes {grid}; pass the checkpoint's audio_stride "
                "/ audio_mel_bins / audio_frames (--audio_stride, --audio_mel_bins, --audio_frames).")
        return dict(arch, patch=[kh, kw], stride=[s, s], input_size=[audio_mel_bins, audio_frames], in_channels=1)
    if kh != kw:
        raise ConversionError(f"{stem_key}: a {kh}x{kw} kernel; depth / thermal stems are square.")
    side = _square_grid(pos_key, patches) * kh
    return dict(arch, patch=[kh, kw], stride=None, input_size=[side, side], in_channels=1)


def imagebind_architecture(sd: Mapping[str, Any], heads: Mapping[str, int] | None = None, *,
                           audio_stride: int = AUDIO_STRIDE, audio_mel_bins: int = AUDIO_MEL_BINS,
                           audio_frames: int = AUDIO_FRAMES) -> dict:
    """{"embed_dim", "modalities", "towers": {m: {width, layers, heads, patch, ...}}} from the shapes."""
    if not is_imagebind(sd):
        raise ConversionError(f"not an ImageBind state dict: no {TRUNK}.* keys (found e.g. {sorted(sd)[:3]}).")
    unknown = sorted(set(heads or {}) - set(MODALITIES))
    if unknown:
        raise ConversionError(f"heads for unknown modalities {unknown} (known: {list(MODALITIES)}).")
    keys = StateDict(sd)
    mods = present_modalities(sd)
    towers, embed_dim = {}, None
    for m in mods:
        t = _tower_architecture(keys, m, heads, audio_stride, audio_mel_bins, audio_frames)
        proj_key = f"{HEAD}.{m}.{HEAD_PROJ[m]}.weight"
        out, w = keys.shape(proj_key)
        if w != t["width"] or (embed_dim is not None and out != embed_dim):
            raise ConversionError(f"{proj_key}: shape {(out, w)}, expected ({embed_dim or 'joint dim'}, {t['width']}).")
        embed_dim = out
        scale_key = f"{POST}.{m}.1.log_logit_scale"
        if m == "vision":
            t["logit_scale"], t["learnable_scale"] = None, False
        else:
            t["logit_scale"] = float(np.exp(keys(scale_key).reshape(())))
            t["learnable_scale"] = m == "text"
        towers[m] = t
    return {"embed_dim": int(embed_dim), "modalities": mods, "towers": towers}


def imagebind_variables(sd: Mapping[str, Any], arch: dict) -> dict:
    """The colearn_jax parameter tree (unscanned layers); every state-dict entry must find its place."""
    take = StateDict(sd)

    def ln(prefix):
        return {"ln": {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}}

    def dense(prefix):
        return {"kernel": take(f"{prefix}.weight").T, "bias": take(f"{prefix}.bias")}

    def block(prefix: str, width: int, heads: int, bias_kv: bool) -> dict:
        hd = width // heads
        w_in, b_in = take(f"{prefix}.attn.in_proj_weight"), take(f"{prefix}.attn.in_proj_bias")
        if w_in.shape != (3 * width, width):
            raise ConversionError(f"{prefix}.attn.in_proj_weight: shape {w_in.shape}, expected {(3 * width, width)}.")
        attn = {name: {"kernel": w.T.reshape(width, heads, hd), "bias": b.reshape(heads, hd)}
                for name, w, b in zip(("query", "key", "value"), np.split(w_in, 3), np.split(b_in, 3))}
        w_out = take(f"{prefix}.attn.out_proj.weight")
        attn["out"] = {"kernel": w_out.T.reshape(heads, hd, width), "bias": take(f"{prefix}.attn.out_proj.bias")}
        if bias_kv:
            for n in ("k", "v"):
                attn[f"bias_{n}"] = take(f"{prefix}.attn.bias_{n}").reshape(heads, hd)
        return {"block": {"ln_1": ln(f"{prefix}.norm_1"), "attn": attn, "ln_2": ln(f"{prefix}.norm_2"),
                          "mlp": {"fc": dense(f"{prefix}.mlp.fc1"), "proj": dense(f"{prefix}.mlp.fc2")}}}

    params = {}
    for m in arch["modalities"]:
        t = arch["towers"][m]
        w = t["width"]
        p = {"positional_embedding": take(_positions_key(m))[0]}
        if m == "text":
            p["token_embedding"] = {"embedding": take(f"{PRE}.text.token_embedding.weight")}
            mask_key = f"{PRE}.text.mask"
            if mask_key in take:  # the causal mask buffer: colearn_jax's text tower is causal by construction
                mask = take(mask_key)
                ctx = t["context_length"]
                if mask.shape != (ctx, ctx) or not np.all(np.isneginf(mask[np.triu_indices(ctx, 1)])) \
                        or np.any(np.tril(mask) != 0):
                    raise ConversionError(f"{mask_key}: not the causal mask over {ctx} tokens.")
        else:
            p["class_embedding"] = take(f"{PRE}.{m}.cls_token").reshape(w)
            if m == "vision":  # Conv3d [w, c, T, p, p] -> [T, p, p, c, w]
                p["patch_embed"] = {"kernel": take(f"{STEM[m]}.weight").transpose(2, 3, 4, 1, 0)}
                p["ln_pre"] = ln(f"{TRUNK}.vision.pre_transformer_layer.0")
            elif m == "imu":  # Linear [w, c * k] -> [c * k, w]; both order the inputs channel-major
                p["patch_embed"] = take(f"{STEM[m]}.proj.weight").T
            else:  # Conv2d [w, 1, kh, kw] -> [kh, kw, 1, w]
                p["patch_embed"] = {"kernel": take(f"{STEM[m]}.proj.weight").transpose(2, 3, 1, 0)}
            if m != "vision":
                p["stem_ln"] = ln(f"{STEM[m]}.norm_layer")
        p["transformer"] = {f"layer_{i}": block(f"{TRUNK}.{m}.blocks.{i}", w, t["heads"], t["add_bias_kv"])
                            for i in range(t["layers"])}
        p["ln_post"] = ln(f"{HEAD}.{m}.{HEAD_LN[m]}")
        p["proj"] = take(f"{HEAD}.{m}.{HEAD_PROJ[m]}.weight").T
        params[m] = p
        if m != "vision":
            scale = take(f"{POST}.{m}.1.log_logit_scale").reshape(())
            if m == "text":
                params["text_logit_scale"] = scale
    take.check_all_used("ImageBind", model="ImageBind")
    return {"params": params}


def scan_layout(variables: dict, arch: dict) -> dict:
    p = variables["params"]
    for m in arch["modalities"]:
        p[m]["transformer"] = stack_layers(p[m]["transformer"], int(arch["towers"][m]["layers"]))
    return variables


def imagebind_config(arch: dict, *, scan: bool = False) -> ml_collections.ConfigDict:
    """configs/imagebind.py's `huge` preset (the released drop-path / dropout rates, CLIP BPE text) with
    the converted sizes and the modalities present."""
    from colearn_jax.configs.imagebind import get_config  # noqa: PLC0415

    config = get_config("huge")
    config.unlock()
    m, mods = config.model, list(arch["modalities"])
    m.update(embed_dim=int(arch["embed_dim"]), scan=bool(scan), modalities=mods)
    for name in list(m.towers.keys()):
        if name not in mods:
            del m.towers[name]
    for name, t in arch["towers"].items():
        tower = m.towers[name]
        for key, value in t.items():
            if key in ("patch", "stride", "input_size"):
                value = None if value is None else [int(x) for x in value]
            elif key in ("mlp_ratio", "logit_scale"):
                value = None if value is None else float(value)
            elif key not in ("add_bias_kv", "learnable_scale"):
                value = int(value)
            tower[key] = value
    d = config.data
    d.image_size = int(m.towers.vision.input_size[0])
    if "audio" in mods:
        d.audio_mel_bins, d.audio_target_length = (int(x) for x in m.towers.audio.input_size)
    if "imu" in mods:
        d.imu_length = int(m.towers.imu.input_size[1])
    if "text" in mods:
        d.context_length = int(m.towers.text.context_length)
    config.loss.pairs = [p for p in config.loss.pairs if p in mods]
    config.eval.zeroshot_modalities = [x for x in config.eval.zeroshot_modalities if x in mods]
    config.eval.retrieval_pairs = [list(p) for p in config.eval.retrieval_pairs if set(p) <= set(mods)]
    config.eval.arithmetic_pairs = [list(p) for p in config.eval.arithmetic_pairs if set(p) <= set(mods)]
    return config


def convert_state_dict(sd: Mapping[str, Any], heads: Mapping[str, int] | None = None, *, scan: bool = False,
                       **audio) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) from an ImageBind state dict; `audio`: audio_stride / audio_mel_bins / audio_frames."""
    arch = imagebind_architecture(sd, heads, **audio)
    variables = imagebind_variables(sd, arch)
    if scan:
        variables = scan_layout(variables, arch)
    return imagebind_config(arch, scan=scan), variables


def parse_heads(spec: str | None) -> dict[str, int]:
    """"vision:16,text:16" -> {"vision": 16, "text": 16}."""
    out = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, n = part.partition(":")
        if not sep or not n.strip().isdigit():
            raise ConversionError(f"--heads entry {part!r}: expected <modality>:<count>, e.g. vision:16.")
        out[name.strip()] = int(n)
    return out


def describe(config) -> str:
    parts = []
    for name in config.model.modalities:
        t = config.model.towers[name]
        stem = ""
        if name != "text":
            stride = f" stride {'x'.join(map(str, t.stride))}" if t.stride else ""
            stem = f", patch {'x'.join(map(str, t.patch))}{stride}, input {'x'.join(map(str, t.input_size))}"
        parts.append(f"{name} {t.width}w x{t.layers} ({t.heads} heads{stem})")
    return f"ImageBind: {'; '.join(parts)}; joint {config.model.embed_dim}; scan={config.model.scan}"
