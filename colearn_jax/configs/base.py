"""The base config every system's config extends: the fields the generic trainer reads.

    python experiments/train.py --config=configs/clip.py:digits --workdir=/tmp/clip   # a system's config

A system's config (e.g. `colearn_jax/configs/clip.py`) starts from `get_config()` here and adds its
`model`, `loss`, its data fields and its eval fields. Generic validation (`colearn_jax.config_checks`)
covers these fields only; each system validates its own (`System.validate_config`).
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # the registered system (colearn_jax.models.get_system)

    c.data = ml_collections.ConfigDict()
    c.data.batch_size = 128  # global, split evenly over processes and data-parallel devices
    c.data.eval_batch_size = 100  # global
    c.data.prefetch = 2  # batches placed on the mesh ahead of the step (0: none)
    # grain reader settings, for systems whose pipeline reads with grain (colearn_jax.data.pipeline)
    c.data.num_threads = 4  # reader threads per process
    c.data.prefetch_buffer_size = 64
    c.data.num_workers = 0  # >0: grain worker processes after batching (mp_prefetch)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | sgd | lars
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9  # sgd, lars
    c.optim.nesterov = False  # sgd
    c.optim.trust_coefficient = 1e-3  # lars
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "cosine"  # cosine | constant
    c.optim.end_lr_factor = 0.0
    c.optim.grad_clip_norm = config_dict.placeholder(float)
    # Parameter groups: [{"pattern": regex on "a/b/kernel" paths, "lr_mult": float, "frozen": bool,
    # "weight_decay": float}]; the first matching pattern wins, the rest use the settings above.
    c.optim.groups = []

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    c.sharding = "dp"  # dp | fsdp | tp | fsdp_tp, or explicit [(logical, mesh axes), ...]

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.log_every = 20
    c.train.eval_every = 100  # 0 disables periodic eval (the last step still evaluates if > 0)
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True
    c.train.compilation_cache_dir = "~/.cache/colearn_jax/xla"  # "" disables the persistent cache
    c.train.progress_bar = True
    # Start from pretrained weights: a directory written by this project or by a converter.
    c.train.init_from = ""
    # "src:dst,src2:dst2" maps subtrees of the pretrained parameters (e.g. "vision:image_tower");
    # "src" alone keeps the name. Empty: the whole tree, which must then match exactly.
    c.train.init_from_map = ""
    c.train.init_from_step = config_dict.placeholder(int)  # default: the newest step
    # A non-finite loss or gradient norm: "stop" (nothing of that state is saved; exit non-zero) or
    # "skip" (the update is dropped on device; more than max_consecutive_skips in a row stops).
    c.train.nonfinite = "stop"
    c.train.max_consecutive_skips = 10
    # Multi-process runs: how often (steps) the processes exchange stop requests (a tiny all-gather that
    # waits for the step in flight); a SIGTERM on one host stops every host at the next exchange.
    c.train.stop_sync_every = 1
    # Keep the best parameters by this eval metric in <workdir>/best ("" disables), e.g. "zeroshot_top1".
    c.train.best_metric = ""
    # Resuming compares the stored config with the requested one and refuses any change to what the run
    # computes (model, optimizer, schedule, loss, num_steps, ...). Name the changes you mean here,
    # comma-separated keys, subtrees or globs, e.g. "train.num_steps" to lengthen a run; "*" allows all.
    c.train.allow_config_change = ""

    c.eval = ml_collections.ConfigDict()
    return c
