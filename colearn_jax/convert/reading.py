"""Reading a converter's inputs, past the file formats (those are `torch_reader.py`).

* `StateDict`: a state dict read key by key, remembering which keys were used, so that an entry
  with no place in colearn_jax's CLIP fails the conversion instead of being silently dropped.
* `normalise_open_clip_layout`: open_clip's CustomTextCLIP key layout -> the standard one.
* `read_open_clip_config` / `read_json`: the model-config JSON files (open_clip's model config or a
  hub `open_clip_config.json`; Hugging Face `config.json`).
* `ConversionError`: what every converter step raises when a checkpoint does not fit.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from colearn_jax.convert.torch_reader import to_numpy

# Buffers / metadata that carry no parameters (OpenAI's TorchScript archives store the three ints).
IGNORED_KEYS = re.compile(
    r"^(input_resolution|context_length|vocab_size|attn_mask|.*\.attn_mask|.*position_ids|"
    r".*num_batches_tracked)$"
)


class ConversionError(ValueError):
    """The checkpoint does not match an architecture colearn_jax can represent exactly."""


class StateDict:
    """Reads a state dict and remembers which keys were used, so nothing is silently dropped."""

    def __init__(self, sd: Mapping[str, Any]):
        self.sd = sd
        self.used: set[str] = set()

    def __contains__(self, key):
        return key in self.sd

    def shape(self, key) -> tuple[int, ...]:
        if key not in self.sd:
            raise ConversionError(f"missing {key!r} in the state dict")
        return tuple(np.shape(self.sd[key]))

    def __call__(self, key) -> np.ndarray:
        if key not in self.sd:
            raise ConversionError(f"missing {key!r} in the state dict")
        self.used.add(key)
        return to_numpy(self.sd[key]).astype(np.float32)

    def mark_used(self, keys):
        self.used.update(keys)

    def check_all_used(self, what: str, model: str = "CLIP"):
        unused = sorted(k for k in self.sd if k not in self.used and not IGNORED_KEYS.match(k))
        if unused:
            raise ConversionError(
                f"{len(unused)} {what} state-dict entries have no place in colearn_jax's {model} (an "
                f"unsupported architecture feature?): {unused[:12]}{' ...' if len(unused) > 12 else ''}"
            )


def count_layers(sd: Mapping[str, Any], pattern: str) -> int:
    """How many layers whose keys match `pattern` (one group: the index); they must be 0..n-1."""
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if idx and idx != set(range(len(idx))):
        raise ConversionError(f"layer indices matching {pattern!r} are not contiguous: {sorted(idx)}")
    return len(idx)


def normalise_open_clip_layout(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """open_clip's CustomTextCLIP keeps the (standard) text tower under `text.`: move it to the top level."""
    if any(k.startswith("visual.trunk.") for k in sd):
        raise ConversionError("open_clip timm image towers (visual.trunk.*) are not supported.")
    if "text.token_embedding.weight" in sd:
        if any(k.startswith(("transformer.", "token_embedding.")) for k in sd):
            raise ConversionError("state dict has both a top-level and a `text.` text tower.")
        return {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    if any(k.startswith("text.") for k in sd):
        raise ConversionError(
            "open_clip text towers other than the CLIP text transformer (e.g. Hugging Face text models under "
            "text.transformer.*) are not supported."
        )
    return sd


def read_json(path: str, what: str) -> dict:
    """A JSON object from `path`; FileNotFoundError / ConversionError name `what` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {what} at {path}.")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path} is not valid JSON: {e}") from e


def read_open_clip_config(model_config: Mapping[str, Any] | str | None) -> dict | None:
    """open_clip's model config (`embed_dim`, `vision_cfg`, `text_cfg`, ...) from a dict or a JSON path;
    a hub `open_clip_config.json` (`{"model_cfg": ..., "preprocess_cfg": ...}`) is unwrapped."""
    if model_config is None:
        return None
    if isinstance(model_config, str):
        model_config = read_json(model_config, "open_clip model config")
    cfg = dict(model_config)
    if "model_cfg" in cfg:  # hub open_clip_config.json: {"model_cfg": ..., "preprocess_cfg": ...}
        cfg = dict(cfg["model_cfg"])
    if "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise ConversionError("an open_clip model config needs embed_dim, vision_cfg and text_cfg.")
    return cfg


def hf_config_path(input_path: str) -> str:
    """`config.json` of a Hugging Face model directory (or of the directory holding a weights file)."""
    directory = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source='hf' needs a CLIPModel directory with config.json; none in {directory}.")
    return path
