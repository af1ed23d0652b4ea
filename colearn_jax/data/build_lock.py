"""One builder at a time: an inter-process lock around "is the local TFDS dataset built? else build it".

Several processes can ask for the same generated dataset at once (the hosts of a multi-host run
sharing a disk, parallel test workers, a notebook beside a training run). TFDS writes into a temporary
directory and renames it, so two concurrent builds of one version race on that rename. `exclusive()`
holds an advisory `flock` on `<data_dir>/.<name>.build.lock` while the caller checks and builds;
a second process waits, then finds the dataset built.
"""
from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def exclusive(data_dir: str, name: str):
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name}.build.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
