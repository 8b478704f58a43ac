"""What the API functions return: the paths written and the numbers measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def __getattr__(name: str) -> Any:
    # ExportResult is the export command's own (paths, verify report, notes, ``ollama_command``),
    # imported on first use: it brings gguf, which ``import llm_ft`` should not pay for.
    if name == "ExportResult":
        from common.export.cmd import ExportResult

        return ExportResult
    raise AttributeError(name)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    summary: dict[str, Any]  # summary.json: steps, tokens/s, best eval loss, ...
    metrics: list[dict[str, Any]]  # metrics.jsonl's events
    status: int = 0  # 0, or 130 after a Ctrl-C that left a checkpoint

    @property
    def best_eval_loss(self) -> float | None:
        return self.summary.get("best_eval_loss")

    def losses(self, event: str = "train") -> list[tuple[int, float]]:
        """(step, loss) of the train (or ``"eval"``) events."""
        key = "loss" if event == "train" else "eval_loss"
        return [(e["step"], e[key]) for e in self.metrics if e.get("event") == event and e.get(key) is not None]


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict[str, Any]  # metrics.json's "metrics": parse rate, accuracy, macro-F1, eval loss, ...
    report: dict[str, Any]  # the whole metrics.json (samples, per-field, confusion, timing)

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]


@dataclass
class ClassifyResult:
    text: str
    answer: str  # the model's raw answer
    data: Any  # the answer parsed as JSON (None when it is not JSON)
    intent: str | None  # data["intent"] when present
    problems: list[str] = field(default_factory=list)  # not JSON, or schema violations

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class PushResult:
    repo: str
    staged: Path  # the folder uploaded (or that would be, with dry_run)
    files: list[str]
    url: str | None = None  # the commit's URL (None for a dry run)
    calls: list[str] = field(default_factory=list)  # the Hub calls made (or that would be)
