"""Put this folder on PYTHONPATH to make every Python process of a test act as if the top-level
packages named in COLEARN_BLOCKED_IMPORTS (comma-separated) were not installed, e.g. the GPU
machine's image, which has no tensorflow_datasets, grain or tensorflow. Python imports
`sitecustomize` at start-up, so subprocesses (the cells of experiments/gpu_suite.sh) are covered.

`import grain` (or any submodule) raises ModuleNotFoundError, so guarded optional imports fall back
as they would on that machine. `importlib.util.find_spec` still answers with a spec that has no
origin, so libraries that only probe for a package at import time (torch._dynamo does) don't fail.
"""
import importlib.abc
import importlib.machinery
import os
import sys

BLOCKED = frozenset(n.strip() for n in os.environ.get("COLEARN_BLOCKED_IMPORTS", "").split(",") if n.strip())


class _Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        raise ModuleNotFoundError(f"No module named {name!r} (blocked by COLEARN_BLOCKED_IMPORTS)", name=name)


if BLOCKED:
    sys.meta_path.insert(0, _Blocked())
