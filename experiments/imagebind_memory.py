"""Lowers and compiles the ImageBind `huge` train step (released sizes, all six towers, scanned layers) on 8
simulated CPU devices under `dp` and `fsdp`, and prints each per-device memory from XLA's memory analysis.

    python experiments/imagebind_memory.py [--batch_size=16]

Nothing is allocated (abstract shapes only). Measured (2-core CPU, batch 16, remat full, 1.201 B params):
  dp:   per device arguments 6.07 GiB, temporaries 1.59 GiB, outputs 6.07 GiB (47 s to lower + compile)
  fsdp: per device arguments 0.76 GiB, temporaries 0.32 GiB, outputs 0.76 GiB (60 s; mesh data=2 x fsdp=4)
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from colearn_jax import cpu_devices  # noqa: E402  (imports no JAX)

cpu_devices.simulate(8)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from colearn_jax.configs.imagebind import get_config  # noqa: E402
from colearn_jax.train.program import TrainProgram  # noqa: E402

BATCH = flags.DEFINE_integer("batch_size", 16, "global batch (a multiple of 8)")
PRESETS = flags.DEFINE_list("presets", ["dp", "fsdp"], "sharding presets to compare")


def main(_):
    for preset in PRESETS.value:
        c = get_config("huge")
        c.unlock()
        c.sharding = preset
        c.mesh.update(data=-1, fsdp=1, model=1) if preset == "dp" else c.mesh.update(data=2, fsdp=4, model=1)
        c.data.batch_size = BATCH.value
        c.model.remat_policy = "full"
        t = time.time()
        program = TrainProgram.build(c)
        compiled = program.lower().compile()
        mem = compiled.memory_analysis()
        gib = lambda x: x / 2**30  # noqa: E731
        n_params = sum(x.size for x in jax.tree.leaves(program.abstract_state.params))
        print(f"{preset}: params {n_params / 1e9:.3f} B; per device: arguments {gib(mem.argument_size_in_bytes):.2f} GiB, "
              f"temporaries {gib(mem.temp_size_in_bytes):.2f} GiB, outputs {gib(mem.output_size_in_bytes):.2f} GiB "
              f"(batch {BATCH.value}, remat full; {time.time() - t:.0f} s to lower + compile)", flush=True)


if __name__ == "__main__":
    app.run(main)
