"""Import public CLIP checkpoints (OpenAI, open_clip, Hugging Face) into colearn_jax.

    python -m colearn_jax.convert --source=openai --input=ViT-B-32.pt --output=/tmp/clip_b32
    python -m colearn_jax.convert --source=open_clip --input=open_clip_model.safetensors \
        --model_config=ViT-B-16.json --output=/tmp/clip_b16
    python -m colearn_jax.convert --source=hf --input=/path/to/clip-vit-base-patch32 --output=/tmp/hf_b32

then `model, variables, config = colearn_jax.load("/tmp/clip_b32")`.

Sources:
  openai     OpenAI's released `.pt` files (TorchScript archives) or a plain state dict with OpenAI's key
             names (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`, ...). There is
             no config: the architecture is read from the tensor shapes (as OpenAI's `build_model` does;
             heads = width / 64 for both towers unless given), activation QuickGELU.
  open_clip  open_clip state dicts (`.safetensors`, `.bin`, `.pt`, training checkpoints with
             `state_dict`) - open_clip keeps OpenAI's key names (CustomTextCLIP: the text tower under
             `text.`) - plus the model-config JSON
             (`embed_dim`, `quick_gelu`, `vision_cfg`, `text_cfg`; or a hub `open_clip_config.json`
             with `model_cfg`). Without the JSON the shapes are used as for `openai`, activation GELU.
  hf         a Hugging Face `CLIPModel` directory: `config.json` + `model.safetensors` (or
             `pytorch_model.bin`, or sharded with an index).

open_clip CoCa checkpoints (keys under `text_decoder.`) become colearn_jax's CoCa (`model.name="coca"`,
through `colearn_jax.convert.coca`); pass the CoCa model-config JSON (e.g. coca_ViT-B-32.json).

Towers: ViT (class token, `ln_pre`, bias-free patch conv, `ln_post` on the class token or on the mean
of the patch tokens) or ModifiedResNet (through `colearn_jax.convert.resnet`); the causal text
transformer pooled at the end-of-text token. Architecture features colearn_jax's CLIP does not have
(layer scale, attentional pooler, timm / HF text towers, a text projection bias, ...) are refused with a
message rather than converted approximately.

This module chains the steps, one file each under colearn_jax/convert/:
  torch_reader.py       file formats (safetensors, torch pickles, TorchScript) -> {name: numpy array}
  reading.py            tracked state-dict access, source key layouts, model-config JSON files
  clip_architecture.py  shapes + model-config JSON -> an architecture dict
  clip_weights.py       state dict -> colearn_jax parameter tree, per source
  clip_config.py        architecture dict -> colearn_jax config
  writing.py            check the variables against the model, save the checkpoint directory
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from colearn_jax.convert import coca
from colearn_jax.convert.clip_architecture import (apply_open_clip_config, hf_architecture,
                                              infer_openai_architecture, set_heads)
from colearn_jax.convert.clip_config import base_config, describe, make_config
from colearn_jax.convert.reading import (ConversionError, hf_config_path, normalise_open_clip_layout,
                                         read_json, read_open_clip_config)
from colearn_jax.convert.torch_reader import read_state_dict
from colearn_jax.convert.clip_weights import (hf_variables, openai_layout_variables, scan_layout, stack_layers,
                                         unstack_layers)
from colearn_jax.convert.writing import check_variables, save_checkpoint

SOURCES = ("openai", "open_clip", "hf")

__all__ = [
    "SOURCES", "ConversionError", "base_config", "check_variables", "convert", "convert_checkpoint",
    "convert_state_dict", "describe", "infer_openai_architecture", "make_config", "save_checkpoint",
    "stack_layers", "unstack_layers",
]


def _check_source(source: str):
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; choose one of {SOURCES}.")


def convert_state_dict(
    state_dict: Mapping[str, Any],
    source: str,
    *,
    model_config: Mapping[str, Any] | str | None = None,
    scan: bool = False,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    base: ml_collections.ConfigDict | None = None,
    check: bool = True,
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) from an in-memory state dict (numpy arrays or torch tensors).

    `model_config`: open_clip's model JSON (dict or path) for `open_clip`, HF's config.json (dict or
    path) for `hf`; optional for `open_clip`, ignored for `openai` unless given (then read as
    open_clip's). `vision_heads` / `text_heads` override the head counts (which no shape reveals).
    """
    _check_source(source)
    if source in ("open_clip", "openai") and coca.is_coca(state_dict):
        arch = coca.coca_architecture(state_dict, read_open_clip_config(model_config))
        if vision_heads is not None:
            arch["vision"]["heads"] = int(vision_heads)
        if text_heads is not None:
            arch["text"]["heads"] = int(text_heads)
        variables = coca.coca_variables(state_dict, arch)
        config = coca.coca_config(arch, scan=scan)
        if scan:
            variables = coca.scan_layout(variables, arch)
        if check:
            check_variables(config, variables)
        return config, variables
    if source == "hf":
        if model_config is None:
            raise ConversionError("source='hf' needs the model's config.json (pass the model directory).")
        if isinstance(model_config, str):
            model_config = read_json(model_config, "Hugging Face config.json")
        arch = hf_architecture(state_dict, model_config)
        variables_of = hf_variables
    else:
        state_dict = normalise_open_clip_layout(state_dict)
        arch = infer_openai_architecture(state_dict)
        cfg = read_open_clip_config(model_config)
        if cfg is not None:
            arch = apply_open_clip_config(arch, cfg)
        elif source == "open_clip":
            arch["activation"] = "gelu"  # open_clip's default; pass the model JSON for -quickgelu models
        variables_of = openai_layout_variables
    set_heads(arch, vision_heads, text_heads)

    variables = variables_of(state_dict, arch)
    config = make_config(arch, scan=scan, base=base)
    if scan:
        variables = scan_layout(variables, arch)
    if check:
        check_variables(config, variables)
    return config, variables


def convert(
    source: str,
    input_path: str,
    *,
    model_config: Mapping[str, Any] | str | None = None,
    scan: bool = False,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) from a checkpoint file or (for `hf`) a model directory.

    `variables` is `{"params": ..., ["batch_stats": ...]}` of numpy float32 arrays, ready for
    `colearn_jax.models.clip_system.build_model(config).apply(variables, batch)`.
    """
    _check_source(source)
    input_path = os.path.abspath(os.path.expanduser(input_path))
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"No checkpoint at {input_path}.")
    if source == "hf" and model_config is None:
        model_config = hf_config_path(input_path)
    state_dict = read_state_dict(input_path)
    return convert_state_dict(state_dict, source, model_config=model_config, scan=scan, vision_heads=vision_heads,
                              text_heads=text_heads)


def convert_checkpoint(source: str, input_path: str, output_dir: str, **kw) -> tuple[ml_collections.ConfigDict, str]:
    """`convert` + `save_checkpoint`. Returns (config, checkpoint directory)."""
    config, variables = convert(source, input_path, **kw)
    return config, save_checkpoint(config, variables, output_dir)
