"""CoCa configs. Run:  python experiments/train.py --config=configs/coca.py:scenes --workdir=/tmp/coca_scenes

Presets: tiny | scenes | scenes_tagged | base | large. The presets live in the package (`colearn_jax/configs/coca.py`,
importable after a normal install); this file is the command line's entry point.
"""
from colearn_jax.configs.coca import get_config  # noqa: F401
