"""The metrics log: ``metrics.jsonl`` (always) plus Weights & Biases / TensorBoard (on request).

Each event is one JSON object with ``event`` (train, eval, sample, nonfinite, checkpoint,
resume, early_stop, interrupt, end), ``step`` and its numbers. Lines are flushed and
fsynced as written, so a killed run keeps its log.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.io import append_jsonl, write_text
from common.train.plot import read_metrics

SCALARS = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "peak_memory")


def check_reporters(names: list[str]) -> None:
    """Fail before training when a requested logger is not installed."""
    def present(name: str) -> bool:
        if name == "tensorboard":  # torch's writer needs the tensorboard package; tensorboardX stands alone
            return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
        return importlib.util.find_spec(name) is not None

    missing = [n for n in names if not present(n)]
    if missing:
        raise UserError(f"--report-to {','.join(missing)}: not installed; pip install {' '.join(missing)}")


def truncate_after(path: Path, step: int) -> None:
    """Drop events logged after ``step`` (a resumed run logs them again)."""
    if not Path(path).exists():
        return
    kept = [e for e in read_metrics(path) if int(e.get("step", 0)) <= step]
    write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))


class MetricsLog:
    def __init__(self, path: Path, report_to: list[str], run_name: str, config: dict[str, Any], log_dir: Path):
        self.path = Path(path)
        self.t0 = time.time()
        self.wandb = None
        self.tb = None
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project="llm-ft", name=run_name, config=config, resume="allow")
        if "tensorboard" in report_to:
            try:  # torch ships a writer; without torch (the MLX backend) use tensorboardX
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(log_dir))

    def log(self, event: str, step: int, **values: Any) -> None:
        record = {"event": event, "step": step, "time_s": round(time.time() - self.t0, 3), **values}
        append_jsonl(self.path, record)
        scalars = {k: v for k, v in values.items() if k in SCALARS and isinstance(v, (int, float))}
        if scalars and self.wandb is not None:
            self.wandb.log({f"{event}/{k}": v for k, v in scalars.items()}, step=step)
        if scalars and self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{event}/{k}", v, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
