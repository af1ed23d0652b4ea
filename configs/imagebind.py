"""ImageBind configs. Run:  python experiments/train.py --config=configs/imagebind.py:digits --workdir=/tmp/imagebind_digits

Presets: tiny | digits | huge, optionally followed by ",from_clip=<dir>" (frozen CLIP vision + text towers).
The presets live in the package (`colearn_jax/configs/imagebind.py`); this file is the command line's entry point.
"""
from colearn_jax.configs.imagebind import get_config  # noqa: F401
