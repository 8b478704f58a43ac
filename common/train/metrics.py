"""The metrics log: ``metrics.jsonl`` (always) plus Weights & Biases / TensorBoard (on request).

Each event is one JSON object with ``event`` (train, eval, sample, nonfinite, checkpoint,
resume, early_stop, interrupt, end), ``step`` and its numbers. Lines are flushed and
fsynced as written, so a killed run keeps its log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.io import append_jsonl, write_text
from common.train.plot import read_metrics


def check_reporters(names: list[str]) -> None:
    """Fail before training when a requested tracker is not installed (common.train.trackers)."""
    from common.train.trackers import check_installed

    check_installed(names)


def truncate_after(path: Path, step: int) -> None:
    """Drop events logged after ``step`` (a resumed run logs them again)."""
    if not Path(path).exists():
        return
    kept = [e for e in read_metrics(path) if int(e.get("step", 0)) <= step]
    write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))


class MetricsLog:
    def __init__(self, path: Path, report_to: list[str], run_name: str, config: dict[str, Any], log_dir: Path,
                 project: str | None = None):
        from common.train.trackers import open_trackers

        self.path = Path(path)
        self.t0 = time.time()
        self.trackers = open_trackers(report_to, run_dir=self.path.parent, run_name=run_name, project=project,
                                      config=config, log_dir=log_dir)

    def log(self, event: str, step: int, **values: Any) -> None:
        from common.train.trackers import tracker_names

        record = {"event": event, "step": step, "time_s": round(time.time() - self.t0, 3), **values}
        append_jsonl(self.path, record)
        scalars = tracker_names(event, values) if self.trackers else {}
        for tracker in self.trackers if scalars else []:
            tracker.log(scalars, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
