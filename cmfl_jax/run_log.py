"""What a training run reports: TensorBoard events, ``metrics.jsonl``, and per-step progress.

On resume, lines of ``metrics.jsonl`` past the restored step are dropped and TensorBoard is
told to purge them, so a step never appears twice in the logs.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging

from cmfl_jax.progress import interactive


def _truncate_jsonl(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a torn last line from a killed run
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def format_seconds(s: float) -> str:
    """``4m07s`` / ``1h05m`` (``?`` for an unknown ETA): durations in log lines and summaries."""
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunLog:
    """TensorBoard + JSONL metrics and a progress bar (or a log line every ``log_every`` steps)."""

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, desc: str = "train", log_every: int = 10):
        from tensorboardX import SummaryWriter  # import here: it is slow and only training needs it

        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        _truncate_jsonl(self.jsonl_path, start_step)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.total, self.start, self.desc, self.log_every = total_steps, start_step, desc, max(1, log_every)
        self.t0 = time.perf_counter()
        self.bar = None
        if interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """Append ``metrics`` (floats) for ``step`` to metrics.jsonl and TensorBoard under ``prefix/``."""
        values = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def progress(self, step: int, metrics: dict | None = None) -> None:
        """Advance the bar to ``step`` (1-based count of finished steps); with ``metrics`` (the loop's means at
        a log step) show them too, or write the log line."""
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        short = {k: f"{float(v):.4g}" for k, v in (metrics or {}).items()}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics is not None:
                self.bar.set_postfix(short, refresh=False)
        elif metrics is not None and (step % self.log_every == 0 or step == self.total):
            losses = " ".join(f"{k}={v}" for k, v in short.items())
            logging.info("%s step %d/%d %s | %.3g steps/s | ETA %s", self.desc, step, self.total, losses, rate,
                         format_seconds(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
