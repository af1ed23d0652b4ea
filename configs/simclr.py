"""SimCLR configs. Run:  python experiments/train.py --config=configs/simclr.py:digit_scenes --workdir=/tmp/simclr_digit_scenes

Presets: tiny | digit_scenes | cifar10 | resnet50_imagenet, optionally followed by ",finetune".
The presets live in the package (`colearn_jax/configs/simclr.py`, importable after a normal install);
this file is the command line's entry point.
"""
from colearn_jax.configs.simclr import get_config  # noqa: F401
