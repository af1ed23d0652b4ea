"""Importers of public PyTorch checkpoints into colearn_jax parameters.

* `colearn_jax.convert.clip`: OpenAI CLIP, open_clip and Hugging Face `CLIPModel` checkpoints ->
  `(config, variables)` and colearn_jax checkpoint directories (`python -m colearn_jax.convert`).
* `colearn_jax.convert.resnet`: CLIP's ModifiedResNet image tower.
* `colearn_jax.convert.torch_reader`: safetensors / torch pickle / TorchScript files -> numpy.
"""
from colearn_jax.convert.clip import (SOURCES, ConversionError, convert, convert_checkpoint,
                                      convert_state_dict, save_checkpoint)
from colearn_jax.convert.torch_reader import CheckpointFormatError, read_state_dict

__all__ = [
    "SOURCES", "ConversionError", "CheckpointFormatError", "convert", "convert_checkpoint",
    "convert_state_dict", "read_state_dict", "save_checkpoint",
]
