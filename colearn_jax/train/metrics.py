"""Metric sinks: JSON lines (`<workdir>/metrics.jsonl`, one object per logged step) and TensorBoard."""
from __future__ import annotations

import json
import os

import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (TensorBoard event files, no TF needed)

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int):
        """Drops rows logged after `step` (a resumed run re-logs the steps it repeats)."""
        rows = [r for r in read_metrics(os.path.dirname(self.path)) if r["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def write(self, step: int, metrics: dict):
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
