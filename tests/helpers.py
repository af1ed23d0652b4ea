"""Shared test helpers: load configs and experiment scripts by file path, synthetic batches, single-device meshes."""
import importlib.util
import os

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str):
    """`spec` like 'clip.py:tiny' (relative to configs/)."""
    fname, _, arg = spec.partition(":")
    path = os.path.join(ROOT, "configs", fname)
    module_spec = importlib.util.spec_from_file_location(f"config_{fname[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def load_experiment(name: str):
    """experiments/<name>.py as a module (its flags are defined only under __main__, so importing is free)."""
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"experiments_{name.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def synthetic_clip_batch(config, batch_size=None, seed=0):
    rng = np.random.RandomState(seed)
    b = batch_size or config.data.batch_size
    s, length = config.data.image_size, config.data.context_length
    text = rng.randint(1, 257, size=(b, length)).astype(np.int32)
    eot = rng.randint(3, length, size=b)
    for i, e in enumerate(eot):
        text[i, e] = 258
        text[i, e + 1:] = 0
    return {"image": rng.randn(b, s, s, 3).astype(np.float32), "text": text}


def one_device_mesh_config():
    return dict(data=1, fsdp=1, model=1)


def first_device():
    return [jax.devices()[0]]
