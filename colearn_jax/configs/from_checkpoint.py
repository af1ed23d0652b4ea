"""Fine-tune a checkpoint with the config stored beside it. Run:

    python experiments/train.py --config=configs/from_checkpoint.py:/tmp/oc_b32 --workdir=/tmp/finetune \
        --config.train.num_steps=1000 --config.optim.lr=1e-5

`get_config(<dir>)` takes any directory this project wrote — a converter's `--output`, a training
workdir, its `checkpoints/` — and returns the config stored with its newest checkpoint, unlocked,
with `train.init_from=<dir>` (and `init_from_step` at that checkpoint, an empty `init_from_map`), so
the run starts from those weights with a model that matches them: no sizes to repeat by hand. Every
field can still be overridden on the command line; fields stored as None get the type of the
system's package config (e.g. `--config.data.data_dir=...`), or of the base config for a system
without one.
"""
import os

import ml_collections
from ml_collections import config_dict

from colearn_jax.configs import base
from colearn_jax.configs import get_config as package_config
from colearn_jax.train.checkpoint import read_config


def _reference(system: str) -> ml_collections.ConfigDict:
    """The system's package config (its field types), or the base config for a system without one."""
    try:
        return package_config(system)
    except ValueError:
        return base.get_config()


def _type_none_fields(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
    """None-valued fields of `config` become placeholders of the reference field's type (JSON loses
    it), so that the command line can set them."""
    for key, value in config.items():
        if key not in reference:
            continue
        if isinstance(value, ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            _type_none_fields(value, reference[key])
        elif value is None and reference.get_type(key) not in (type(None), object):
            config[key] = config_dict.placeholder(reference.get_type(key))


def get_config(arg: str) -> ml_collections.ConfigDict:
    """`arg`: the checkpoint directory (a workdir, its `checkpoints/`, or a converter's output)."""
    if not arg:
        raise ValueError("configs/from_checkpoint.py needs a directory: --config=configs/from_checkpoint.py:<dir>")
    path = os.path.abspath(os.path.expanduser(arg))
    stored, step, _ = read_config(path)
    config = ml_collections.ConfigDict(stored)
    name = config.get("model", {}).get("name")
    if not name:
        raise ValueError(f"The config stored in {path} (step {step}) names no model.name.")
    _type_none_fields(config, _reference(name))
    config.train.init_from = path
    config.train.init_from_map = ""
    config.train.init_from_step = step
    return config
