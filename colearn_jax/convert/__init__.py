"""Importers of public PyTorch checkpoints into colearn_jax parameters.

* `clip`: OpenAI CLIP, open_clip and Hugging Face `CLIPModel` checkpoints -> `(config, variables)`
  and colearn_jax checkpoint directories (`python -m colearn_jax.convert`); it chains
  `clip_architecture` (shapes + model-config JSON -> architecture), `clip_weights` (state dict ->
  parameter tree, per source) and `clip_config` (architecture -> config).
* `resnet`: CLIP's ModifiedResNet image tower.
* `imagebind`: facebookresearch/ImageBind checkpoints (`imagebind_huge.pth`) -> colearn_jax's ImageBind.
* `torch_reader`: safetensors / torch pickle / TorchScript files -> numpy; `reading`: tracked
  state-dict access and model-config JSON; `writing`: check and save a converted checkpoint.
"""
from colearn_jax.convert.clip import (SOURCES, ConversionError, convert, convert_checkpoint,
                                      convert_state_dict, save_checkpoint)
from colearn_jax.convert.torch_reader import CheckpointFormatError, read_state_dict

__all__ = [
    "SOURCES", "ConversionError", "CheckpointFormatError", "convert", "convert_checkpoint",
    "convert_state_dict", "read_state_dict", "save_checkpoint",
]
