"""Metric sinks: JSON lines (`<workdir>/metrics.jsonl`, one object per logged step) and TensorBoard.

A resumed run repeats the steps after its checkpoint, so `truncate_after(step)` first drops what the
interrupted segment logged after `step`: rows of metrics.jsonl, and events of the existing TensorBoard
files (each file is rewritten without them, through a temporary file and an atomic rename; a record
cut short by a kill is dropped too). Each segment then writes its own new events file, opened lazily
at its first row and written synchronously (each row is on disk when `write` returns, like the JSON
line), so no step appears twice per tag and none is lost, however often a run is killed and resumed.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import time

import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tensorboard") if tensorboard else None
        self._tb = None

    def _tensorboard(self):
        """This segment's events file, written synchronously (tensorboardX's SummaryWriter queues events
        in a thread that writes them up to `flush_secs` later, so a killed run lost its last rows)."""
        if self._tb is None and self.tb_dir:
            from tensorboardX.event_file_writer import EventsWriter  # noqa: PLC0415 (no TF needed)

            os.makedirs(self.tb_dir, exist_ok=True)
            # a unique suffix: two segments started within one second must not share (and truncate) a file
            self._tb = EventsWriter(os.path.join(self.tb_dir, "events"), f".{os.getpid()}.{time.time_ns()}")
        return self._tb

    def truncate_after(self, step: int):
        """Drops rows and TensorBoard events logged after `step` (a resumed run re-logs the steps it repeats)."""
        rows = [r for r in read_metrics(os.path.dirname(self.path)) if r["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if self.tb_dir and self._tb is None:  # never rewrite the file this writer has open
            for path in sorted(glob.glob(os.path.join(self.tb_dir, "events.out.tfevents.*"))):
                drop_events_after(path, step)

    def write(self, step: int, metrics: dict):
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            from tensorboardX.proto import event_pb2, summary_pb2  # noqa: PLC0415

            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in row.items() if k != "step"]
            tb.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))
            tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------- TensorBoard event files
def event_records(path: str) -> list[bytes]:
    """The complete TFRecord frames of an events file (length, its CRC, data, data CRC), verbatim; a
    frame cut short at the end (a killed writer) is left out."""
    with open(path, "rb") as f:
        blob = f.read()
    frames, pos = [], 0
    while pos + 12 <= len(blob):
        (length,) = struct.unpack_from("<Q", blob, pos)
        end = pos + 12 + length + 4
        if end > len(blob):
            break
        frames.append(blob[pos:end])
        pos = end
    return frames


def _event_step(frame: bytes) -> int:
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    event = event_pb2.Event()
    event.ParseFromString(frame[12:-4])
    return int(event.step)


def drop_events_after(path: str, step: int) -> int:
    """Rewrites the events file at `path` without events whose step is > `step` (and without a torn last
    record). Returns how many frames were dropped; leaves the file alone when there are none."""
    frames = event_records(path)
    kept = [f for f in frames if _event_step(f) <= step]
    torn = os.path.getsize(path) != sum(len(f) for f in frames)
    if len(kept) == len(frames) and not torn:
        return 0
    tmp = os.path.join(os.path.dirname(path), f".rewrite-{os.getpid()}")  # no "tfevents": TB ignores it
    with open(tmp, "wb") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(frames) - len(kept)
