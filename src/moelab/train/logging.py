"""Run logs: JSONL metrics (always), TensorBoard (optional), a rich progress bar with ETA.

``metrics.jsonl`` holds one JSON object per line with ``kind`` ``train`` (step loss, lr,
tokens/s, aux and z losses, drop rate, max expert load, grad norm, skipped steps) or ``eval``
(validation loss, perplexity, per-domain loss, expert load per layer). It is the source of the
compare report's plots. On resume, records after the resumed step are dropped, so a resumed
run's log equals an uninterrupted one's; that rewrite is atomic, so a crash during it cannot
lose the log. Whether a fresh log may start in a folder is decided before, by
``moelab.train.run_folder`` (an earlier run's log is never truncated by accident).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moelab.errors import UserError
from moelab.outputs import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"  # TensorBoard event files
TB_EVENTS_PREFIX = "events.out.tfevents."


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class MetricsLogger:
    """Appends records to ``RUN/metrics.jsonl`` and, if asked, to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard=true needs TensorBoard: pip install 'moelab[tb]'") from None
            self.tb = SummaryWriter(str(Path(run_dir) / TB_DIR))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A rich progress bar with ETA and the latest loss; silent when disabled."""

    def __init__(self, total: int, start: int, description: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as _P

            self.bar = _P(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(description, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
