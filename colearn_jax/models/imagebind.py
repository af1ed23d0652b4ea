"""ImageBind: one embedding space for six modalities, bound through images (Girdhar et al. 2023,
Sec. 3 and 4 "Implementation details"; layout as facebookresearch/ImageBind `imagebind_model.py`).

Every modality runs preprocessor -> trunk -> head -> postprocessor:
- preprocessor: a bias-free patch stem, a class token (text: none) and learned positions.
  vision: images repeated to 2 frames, Conv3d kernel = stride (2, 14, 14), then `ln_pre` before the
  trunk; video comes as clips [b, clips, T, H, W, 3], embedded per clip and averaged.
  text: token + position embeddings (context 77), causal trunk, pooled at the end-of-text token.
  audio: log-mel [b, clips, 1, 128, 204] (colearn_jax.data.audio), Conv2d 16x16 stride 10, LayerNorm.
  depth, thermal: 1-channel Conv2d kernel = stride 16, LayerNorm.
  IMU: [b, 6, 2000] cut into 250 patches of 8 samples x 6 channels, bias-free Linear 48 -> D, LayerNorm.
- trunk: the shared pre-LN `TransformerStack` (LN eps 1e-6, exact GELU, MLP 4x); audio, depth,
  thermal and IMU attention append a learned key/value (`add_bias_kv`) and use stochastic depth rising
  linearly over the layers (audio 0.1, IMU 0.7 at the released sizes).
- head: LayerNorm -> token 0 (text: EOT) -> (IMU: dropout 0.5) -> bias-free Linear to the joint space.
- postprocessor: L2 normalisation and a logit scale: vision none, text learnable (init 1/0.07, its
  exp clipped at 100), audio 20, depth 5, thermal 10, IMU 5 fixed.

The image and text towers have the parameter layout of colearn_jax's CLIP towers except the 3-D
patch kernel [2, p, p, 3, w]; `models/imagebind_system.py:inflate_clip` turns a CLIP checkpoint into
ImageBind's (kernel / 2 per frame: the same function on images), so `train.init_from` starts from it.
Initialisation (explicit for every parameter): patch/linear stems lecun-normal, class tokens and
positions N(0, w^-1/2) (IMU and text positions 0.01, token embeddings 0.02), attention q/k/v std
(2w)^-1/2 and out w^-1/2 and MLP (2/5w)^1/2 (the variances of the reference's xavier-uniform),
learned bias k/v N(0, 0.02), heads w^-1/2, LayerNorms 1/0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.losses.contrastive import l2_normalize
from colearn_jax.nn import layers
from colearn_jax.nn.transformer import BlockConfig, TransformerStack

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")
MAX_LOGIT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One modality's encoder. `patch` is the stem kernel (= stride unless `stride` is given):
    vision (T, p, p); audio / depth / thermal (p, p); IMU (samples per patch,)."""

    modality: str
    width: int
    layers: int
    heads: int
    patch: tuple = (16, 16)
    stride: tuple | None = None
    input_size: tuple = (224, 224)  # vision/depth/thermal (H, W); audio (mel, frames); imu (channels, length)
    in_channels: int = 1
    mlp_ratio: float = 4.0
    add_bias_kv: bool = False
    drop_path: float = 0.0
    head_dropout: float = 0.0
    vocab_size: int = 49408  # text
    context_length: int = 77  # text
    logit_scale: float | None = None  # fixed scale after normalisation (None: none)
    learnable_scale: bool = False  # text: a learned log-scale initialised at log(logit_scale)

    @property
    def num_patches(self) -> int:
        if self.modality == "text":
            return 0
        if self.modality == "imu":
            return self.input_size[1] // self.patch[0]
        stride = self.stride or self.patch
        spatial = [(n - k) // s + 1 for n, k, s in zip(self.input_size, self.patch[-2:], stride[-2:])]
        return math.prod(spatial)


def _conv_stem(x, cfg: TowerConfig, dtype):
    """Bias-free conv over channels-last input; returns [b, tokens, width]."""
    kernel = tuple(cfg.patch)
    stride = tuple(cfg.stride or cfg.patch)
    spatial_axes = (None,) * len(kernel)
    y = nn.Conv(cfg.width, kernel, strides=stride, padding="VALID", use_bias=False, dtype=dtype,
                kernel_init=layers.with_axes(nn.initializers.lecun_normal(), spatial_axes + ("channels", "embed")),
                name="patch_embed")(x.astype(dtype))
    return y.reshape(y.shape[0], -1, cfg.width)


class ModalityTower(nn.Module):
    """Preprocessor + trunk + head of one modality: input -> un-normalised [b, output_dim]."""

    cfg: TowerConfig
    output_dim: int
    scan: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None
    dtype: Any = jnp.float32

    def _tokens(self, x):
        c, w = self.cfg, self.cfg.width
        scale = w**-0.5
        if c.modality == "text":
            embed = nn.Embed(c.vocab_size, w, dtype=self.dtype, embedding_init=layers.normal(0.02, ("vocab", "embed")),
                             name="token_embedding")
            pos = self.param("positional_embedding", layers.normal(0.01, ("length", "embed")), (c.context_length, w))
            return embed(x) + pos[: x.shape[1]].astype(self.dtype)
        if c.modality == "vision":
            if x.ndim == 4:  # image -> a video of T identical frames (PadIm2Video, "repeat")
                x = jnp.repeat(x[:, None], c.patch[0], axis=1)
            tokens = _conv_stem(x, c, self.dtype)
        elif c.modality == "imu":
            b, ch, length = x.shape
            k = c.patch[0]
            x = x[..., : (length // k) * k].reshape(b, ch, length // k, k).transpose(0, 2, 1, 3).reshape(b, length // k, ch * k)
            kernel = self.param("patch_embed", layers.with_axes(nn.initializers.lecun_normal(), ("channels", "embed")),
                                (ch * k, w))
            tokens = layers.contract(x.astype(self.dtype), kernel.astype(self.dtype))
        else:  # audio [b, 1, mel, frames] / depth, thermal [b, H, W, 1]
            if c.modality == "audio":
                x = jnp.moveaxis(x, -3, -1)  # channels first (reference) -> last
            tokens = _conv_stem(x, c, self.dtype)
        if c.modality != "vision":
            tokens = layers.LayerNorm(1e-5, name="stem_ln")(tokens)  # PatchEmbedGeneric's norm_layer
        pos_std = 0.01 if c.modality == "imu" else scale
        cls = self.param("class_embedding", layers.normal(scale, ("embed",)), (w,))
        pos = self.param("positional_embedding", layers.normal(pos_std, ("length", "embed")), (c.num_patches + 1, w))
        b = tokens.shape[0]
        tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(tokens.dtype), (b, 1, w)), tokens], axis=1)
        if tokens.shape[1] != pos.shape[0]:
            raise ValueError(f"{c.modality}: {tokens.shape[1] - 1} patches but positions for {c.num_patches}; "
                             f"check config.model.{c.modality}.input_size / patch.")
        return tokens + pos.astype(tokens.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c, w = self.cfg, self.cfg.width
        tokens = nn.with_logical_constraint(self._tokens(x), ("batch", "length", "embed"))
        if c.modality == "vision":
            tokens = layers.LayerNorm(1e-6, name="ln_pre")(tokens)
        mlp = int(w * c.mlp_ratio)
        block = BlockConfig(
            num_heads=c.heads, mlp_dim=mlp, activation="gelu", ln_eps=1e-6, causal=c.modality == "text",
            attn_qkv_std=(2 * w) ** -0.5, attn_out_std=w**-0.5, mlp_fc_std=(2 / (5 * w)) ** 0.5,
            mlp_proj_std=(2 / (5 * w)) ** 0.5, add_bias_kv=c.add_bias_kv, drop_path=c.drop_path,
            attention_impl=self.attention_impl,
        )
        tokens = TransformerStack(c.layers, block, scan=self.scan, remat_policy=self.remat_policy,
                                  deterministic=not train, dtype=self.dtype, drop_path_progressive=True,
                                  name="transformer")(tokens)
        tokens = layers.LayerNorm(1e-6, name="ln_post")(tokens)  # the head's LayerNorm
        if c.modality == "text":
            pooled = jnp.take_along_axis(tokens, jnp.argmax(x, axis=-1)[:, None, None], axis=1)[:, 0]
        else:
            pooled = tokens[:, 0]
        pooled = nn.Dropout(c.head_dropout)(pooled, deterministic=not train)
        proj = self.param("proj", layers.normal(w**-0.5, ("embed", "proj")), (w, self.output_dim))
        return pooled @ proj.astype(pooled.dtype)


class ImageBind(nn.Module):
    """`towers`: TowerConfigs (one per modality, any subset of MODALITIES)."""

    towers: tuple
    embed_dim: int
    scan: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None
    dtype: Any = jnp.float32

    def setup(self):
        self.tower_cfgs = {c.modality: c for c in self.towers}
        self.encoders = {
            m: ModalityTower(c, self.embed_dim, self.scan, self.remat_policy, self.attention_impl, self.dtype, name=m)
            for m, c in self.tower_cfgs.items()
        }
        if "text" in self.tower_cfgs and self.tower_cfgs["text"].learnable_scale:
            init = math.log(self.tower_cfgs["text"].logit_scale or 1 / 0.07)
            self.text_logit_scale = self.param(
                "text_logit_scale", nn.with_logical_partitioning(nn.initializers.constant(init), ()), ())

    def log_scale(self, modality: str) -> jax.Array:
        """log of the postprocessor's scale (0 for none); text: learned, clipped at log 100."""
        c = self.tower_cfgs[modality]
        if c.learnable_scale:
            return jnp.minimum(self.text_logit_scale, math.log(MAX_LOGIT_SCALE))
        return jnp.asarray(math.log(c.logit_scale) if c.logit_scale else 0.0, jnp.float32)

    def embed_unit(self, modality: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Unit-norm [b, D]. Multi-clip inputs (video [b,S,T,H,W,C], audio [b,S,1,mel,frames]) are embedded
        per clip, normalised and averaged, then re-normalised (the training objective's embedding)."""
        return l2_normalize(self._clip_mean(modality, x, train))

    def _clip_mean(self, modality, x, train):
        clips = (modality == "vision" and x.ndim == 6) or (modality == "audio" and x.ndim == 5)
        if not clips:
            return l2_normalize(self.encoders[modality](x, train))
        b, s = x.shape[:2]
        e = l2_normalize(self.encoders[modality](x.reshape((b * s,) + x.shape[2:]), train))
        return e.reshape(b, s, -1).mean(axis=1)

    def encode(self, modality: str, x: jax.Array, train: bool = False) -> jax.Array:
        """The reference's output: mean over clips of exp(log_scale) * normalised embedding."""
        return jnp.exp(self.log_scale(modality)) * self._clip_mean(modality, x, train)

    def __call__(self, batch: dict, train: bool = False) -> dict:
        """{modality: input} (keys "image"/"video" feed the vision tower) -> {"<m>_embeds": unit [b, D],
        "<m>_log_scale": scalar} for every modality present."""
        out = {}
        for key, value in batch.items():
            m = "vision" if key in ("image", "video") else key
            if m not in self.encoders:
                continue
            out[f"{m}_embeds"] = self.embed_unit(m, value, train)
            out[f"{m}_log_scale"] = self.log_scale(m)
        return out
