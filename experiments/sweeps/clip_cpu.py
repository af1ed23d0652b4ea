"""A small scaling sweep for a CPU host: the `digits` CLIP on 1-8 simulated devices.

  python experiments/scaling_study.py --sweep=experiments/sweeps/clip_cpu.py --outdir=/tmp/scaling_cpu
  python experiments/scaling_study.py --sweep=experiments/sweeps/clip_cpu.py --compile_only --outdir=/tmp/scaling_mem

Fields:
  base_config       config file + preset the points start from (any `--config` spec).
  overrides         nested config values applied to every point, e.g. {"model": {"dtype": "bfloat16"}};
                    leaves can also be set on the command line: --sweep.overrides.model.dtype=bfloat16.
  num_cpu_devices   simulated CPU devices (XLA_FLAGS before JAX starts); 0 = the real devices (GPU/TPU).
  shardings         rule presets to sweep.
  meshes            explicit mesh shapes {data, fsdp, model}; the product is the device count of the point
                    (the first N devices). -1 fills all devices. A mesh needing more devices than exist is an error.
  per_device_batch  examples per data-parallel replica; global batch = per_device_batch * data * fsdp.
  tp_needs_model_axis  skip tp / fsdp_tp on meshes with model == 1 (they equal dp / fsdp there).
  steps, warmup     timed and untimed steps per point (ignored with --compile_only).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base_config = "configs/clip.py:digits"
    c.overrides = ml_collections.ConfigDict({"model": {"dtype": "float32"}})
    c.num_cpu_devices = 8
    c.shardings = ("dp", "fsdp", "tp", "fsdp_tp")  # tuples: overridable, --sweep.shardings="('dp',)"
    c.meshes = (
        dict(data=1, fsdp=1, model=1),
        dict(data=2, fsdp=1, model=1),
        dict(data=4, fsdp=1, model=1),
        dict(data=8, fsdp=1, model=1),
        dict(data=1, fsdp=1, model=2),
        dict(data=2, fsdp=1, model=2),
        dict(data=4, fsdp=1, model=2),
    )
    c.per_device_batch = (8, 32)
    c.tp_needs_model_axis = True
    c.steps = 3
    c.warmup = 1
    return c
