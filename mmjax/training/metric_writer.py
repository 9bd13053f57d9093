"""Run output on process 0: a progress line, `metrics.jsonl`, TensorBoard event files (tensorboardX,
no TensorFlow)."""

from __future__ import annotations

import json
import math
import os
import time

import jax

from mmjax.config import flatten


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricWriter:
    """`resume_step`: the step a run (re)starts from. What an earlier attempt logged after it (steps
    that are trained again, the final evaluation that is made again) is dropped from `metrics.jsonl`
    and hidden in TensorBoard, so that no step is written twice."""

    def __init__(self, workdir: str, total_steps: int, batch_size: int, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._last = None  # (time, step) of the last progress line
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if os.path.exists(path):  # an earlier attempt (0: one killed before its first checkpoint)
                _drop_after(path, resume_step)
            self._jsonl = open(path, "a")  # noqa: SIM115 (closed in close())
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=resume_step + 1)

    def write(self, event: str, step: int, values: dict) -> None:
        """One JSON object per event: {"event", "step", "time", **values}; scalars to TensorBoard."""
        if not self.active:
            return
        record = {"event": event, "step": int(step), "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in flatten(values, sep="/").items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{event}/{k}", v, int(step))
        self._tb.flush()

    def images(self, step: int, pngs: dict, prefix: str = "report") -> None:
        """PNG figures ({name: bytes}) to TensorBoard as images `prefix/name`."""
        if not self.active or not pngs:
            return
        import io

        import numpy as np
        from PIL import Image

        for name, data in pngs.items():
            image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            self._tb.add_image(f"{prefix}/{name}", image, int(step), dataformats="HWC")
        self._tb.flush()

    def progress(self, step: int, loss: float, compiled_fraction: float | None = None) -> dict:
        """Prints `step, loss, steps/s, examples/s, ETA`; returns the rates."""
        now = time.perf_counter()
        rates = {}
        if self._last is not None and step > self._last[1]:
            sps = (step - self._last[1]) / (now - self._last[0])
            rates = {"steps_per_s": round(sps, 3), "examples_per_s": round(sps * self.batch_size, 1)}
            eta = _fmt_seconds((self.total_steps - step) / sps)
        else:
            eta = "?"
        self._last = (now, step)
        if self.active:
            line = f"step {step:>6d}/{self.total_steps}  loss {loss:.4f}"
            if rates:
                line += f"  {rates['steps_per_s']:.2f} steps/s  {rates['examples_per_s']:.0f} ex/s  ETA {eta}"
            print(line, flush=True)
        return rates

    def reset_clock(self, step: int) -> None:
        """Restart rate measurement (after evaluation or compilation, which are not steps)."""
        self._last = (time.perf_counter(), step)

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()


def _drop_after(path: str, step: int) -> None:
    """Rewrites `metrics.jsonl` without the records that a run resumed at `step` writes again: those of
    later steps, and the end-of-run events (test, run: a finished run relaunched evaluates again, its
    test record at the best checkpoint's step). A torn last line (the process was killed while writing
    it) goes too."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            s, event = record.get("step", 0), record.get("event")
            at_resume = s == step and event in ("train", "validation", "pretrain")  # written before the checkpoint
            if event not in ("test", "run") and (s < step or at_resume):
                kept.append(json.dumps(record) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
