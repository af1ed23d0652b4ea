"""CLIP configs. Run:  python experiments/train.py --config=configs/clip.py:digits --workdir=/tmp/clip_digits

Presets: tiny | digits | vit_b32 | vit_b16 | vit_l14 | rn50, optionally followed by ",siglip".
The presets live in the package (`colearn_jax/configs/clip.py`, importable after a normal install);
this file is the command line's entry point.
"""
from colearn_jax.configs.clip import get_config  # noqa: F401
