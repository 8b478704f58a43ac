"""Experiment trackers fed from the metrics log: Weights & Biases and TensorBoard.

Every event that ``metrics.jsonl`` records also goes to each tracker, under the names TRL
and the transformers Trainer use (``train/loss``, ``train/learning_rate``,
``train/grad_norm``, ``eval/loss``...), so dashboards built for those runs work here.
Both are optional extras (``pip install 'llm-ft[wandb]'`` / ``'llm-ft[tensorboard]'``),
imported only when asked for. TensorBoard's event files are written with the
``tensorboard`` package's own writer, which needs neither torch nor TensorFlow, so the
MLX backend logs the same files.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Protocol

from common.errors import UserError

CHOICES = ("none", "wandb", "tensorboard")
EXTRA = {"wandb": "wandb", "tensorboard": "tensorboard"}
# (event, metrics.jsonl key) -> tracker name, as TRL / transformers.Trainer log them.
NAMES = {
    ("train", "loss"): "train/loss",
    ("train", "lr"): "train/learning_rate",
    ("train", "grad_norm"): "train/grad_norm",
    ("train", "epoch"): "train/epoch",
    ("train", "tokens_per_s"): "train/tokens_per_second",
    ("train", "tokens"): "train/num_tokens",
    ("eval", "eval_loss"): "eval/loss",
    ("eval", "best_eval_loss"): "eval/best_loss",
}


def tracker_names(event: str, values: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics event, under their tracker names (others are not tracked)."""
    out = {}
    for key, value in values.items():
        name = NAMES.get((event, key))
        if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def selected(report_to: list[str]) -> list[str]:
    """The trackers asked for: 'none' (alone, as in TRL) turns them all off."""
    return [] if "none" in report_to else [r for r in report_to if r in EXTRA]


def check_installed(report_to: list[str]) -> None:
    """Fail before training when a requested tracker is not installed."""
    missing = [n for n in selected(report_to) if importlib.util.find_spec(EXTRA[n]) is None]
    if missing:
        extras = ",".join(missing)
        raise UserError(f"--report-to {extras}: not installed; pip install 'llm-ft[{extras}]'")


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class WandbTracker:
    """One W&B run per training run; WANDB_MODE=offline writes it under RUN/wandb/ for a later sync."""

    def __init__(self, run_dir: Path, run_name: str, project: str | None, config: dict[str, Any]):
        import wandb

        # The run directory's name is the W&B id: a --resume continues the same W&B run.
        self.run = wandb.init(project=project, name=run_name, id=_wandb_id(run_dir), config=config,
                              dir=str(run_dir), resume="allow", reinit="finish_previous")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_dir.resolve().name)[:48]
    return f"{name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"


class TensorBoardTracker:
    """Scalars in TensorBoard event files under ``log_dir`` (tensorboard's EventFileWriter)."""

    def __init__(self, log_dir: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_trackers(report_to: list[str], *, run_dir: Path, run_name: str, project: str | None,
                  config: dict[str, Any], log_dir: Path) -> list[Tracker]:
    trackers: list[Tracker] = []
    for name in selected(report_to):
        if name == "wandb":
            trackers.append(WandbTracker(run_dir, run_name, project, config))
        elif name == "tensorboard":
            trackers.append(TensorBoardTracker(log_dir))
    return trackers
