"""Fine-tune a checkpoint with its stored config. Run:

    python experiments/train.py --config=configs/from_checkpoint.py:/tmp/oc_b32 --workdir=/tmp/finetune

The config is the one saved with the newest checkpoint in the directory (a converter's --output or a
training workdir), with train.init_from set to it; see `colearn_jax/configs/from_checkpoint.py`.
"""
from colearn_jax.configs.from_checkpoint import get_config  # noqa: F401
