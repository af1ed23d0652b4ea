"""A Python environment for open_clip's CoCa `generate`, which needs transformers < 5.

open_clip 3.3 imports its logits processors and `BeamSearchScorer` from transformers in one block;
`BeamSearchScorer` is gone in transformers 5, so with 5.x the whole block fails and `CoCa.generate`
(greedy and sampling too, not only beam search) asserts "Please install transformers". Code that runs
it (tests/test_convert_coca.py's reference, experiments/coca_decoding.py's timing) does so in a
subprocess whose PYTHONPATH starts with a directory holding transformers 4.x: `subprocess_env()`.

That directory is `transformers4_path()`: None when this environment's own transformers is < 5
(nothing to add), else `$COLEARN_TRANSFORMERS4_PATH`, else ~/.cache/colearn_jax/transformers4, filled
once with `pip install --target DIR transformers==4.55.4 tokenizers==0.21.4 huggingface-hub==0.36.0`
(the package index the environment was installed from; the main environment keeps its transformers).
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

TRANSFORMERS4 = ("transformers==4.55.4", "tokenizers==0.21.4", "huggingface-hub==0.36.0")
ENV_PATH = "COLEARN_TRANSFORMERS4_PATH"
DEFAULT_PATH = "~/.cache/colearn_jax/transformers4"


def transformers4_path() -> str | None:
    """The directory to put first on a subprocess' PYTHONPATH (module docstring), installed when
    missing; raises RuntimeError with pip's output when that fails."""
    try:
        if int(importlib.metadata.version("transformers").split(".")[0]) < 5:
            return None
    except importlib.metadata.PackageNotFoundError:
        pass
    path = os.environ.get(ENV_PATH) or os.path.expanduser(DEFAULT_PATH)
    if not os.path.isdir(os.path.join(path, "transformers")):
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--target", path, *TRANSFORMERS4]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode or not os.path.isdir(os.path.join(path, "transformers")):
            raise RuntimeError(f"open_clip's CoCa.generate needs transformers < 5; `{' '.join(cmd)}` failed:\n"
                               f"{done.stderr[-2000:]}")
    return path


def subprocess_env(base: dict | None = None) -> dict:
    """A copy of `base` (default os.environ) with `transformers4_path()` first on PYTHONPATH and no
    XLA_FLAGS (a simulated device count is no business of the torch side)."""
    env = dict(os.environ if base is None else base)
    extra = transformers4_path()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    env.pop("XLA_FLAGS", None)
    return env
