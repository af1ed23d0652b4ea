"""Memory-per-device sweep of the paper-size CLIP ViT-B/16 on 1-8 simulated devices (compile only).

  python experiments/scaling_study.py --sweep=experiments/sweeps/clip_vit_b16_memory.py --compile_only \
      --outdir=/tmp/scaling_vit_b16

Nothing is allocated: each point lowers and compiles the sharded train step and reads XLA's
per-device memory plan, so the plot shows how dp / fsdp / tp / fsdp_tp trade parameter and
optimizer-state memory (~1.7 GiB for 150M params in fp32 with AdamW) against activation memory.
On accelerators, copy this file, set num_cpu_devices = 0 and drop --compile_only to time the points.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base_config = "configs/clip.py:vit_b16"
    c.overrides = ml_collections.ConfigDict({"model": {"dtype": "bfloat16", "remat_policy": "dots"}})
    c.num_cpu_devices = 8
    c.shardings = ("dp", "fsdp", "tp", "fsdp_tp")
    c.meshes = (
        dict(data=1, fsdp=1, model=1),
        dict(data=2, fsdp=1, model=1),
        dict(data=4, fsdp=1, model=1),
        dict(data=8, fsdp=1, model=1),
        dict(data=1, fsdp=1, model=2),
        dict(data=2, fsdp=1, model=2),
        dict(data=4, fsdp=1, model=2),
    )
    c.per_device_batch = (32,)
    c.tp_needs_model_axis = True
    c.steps = 3
    c.warmup = 1
    return c
