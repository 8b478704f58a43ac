"""The live training display (rich): step, loss, eval loss, lr, tokens/s, peak memory, ETA
(and, for DPO/ORPO, the mean reward margin and accuracy of the step's pairs).

On a terminal it is a progress bar with the numbers beside it; in a log (no terminal)
it prints one plain line every few percent so CI logs stay readable.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def clock(seconds: float) -> str:
    """h:mm:ss, as rich's elapsed column shows it."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LogLines:
    """Progress for logs (no terminal: CI, nohup, a pipe): a plain line every ~5% with elapsed and ETA."""

    def __init__(self, label: str, total: int, console: Console, start: int = 0, lines: int = 20):
        self.label, self.total, self.console, self.start = label, total, console, start
        self.every = max(1, total // lines)
        self.t0 = time.monotonic()
        self.printed = start

    def eta(self, done: int) -> str:
        rate = (done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        return clock((self.total - done) / rate) if rate > 0 else "?"

    def update(self, done: int, text: str = "") -> None:
        if done == self.printed or not (done - self.printed >= self.every or done >= self.total):
            return
        self.printed = done
        self.console.print(f"{self.label} {done}/{self.total}  {text}{'  ' if text else ''}"
                           f"elapsed {clock(time.monotonic() - self.t0)}  eta {self.eta(done)}",
                           highlight=False, soft_wrap=True)


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int = 0, console: Console | None = None, world_size: int = 1):
        self.console = console or Console(stderr=True)
        self.world_size = world_size  # > 1: total tokens/s of the job, then per process
        self.total = total_steps
        self.live = self.console.is_terminal
        self.fields = {"loss": "-", "eval": "-", "lr": "-", "tps": "-", "mem": "-", "pref": ""}
        self.progress = None
        self.lines = LogLines("step", total_steps, self.console, start=start_step)
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  eval {task.fields[eval]}  lr {task.fields[lr]}  "
                           "{task.fields[tps]} tok/s  mem {task.fields[mem]}{task.fields[pref]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, **self.fields)

    def __enter__(self) -> TrainProgress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, step: int, *, loss: float | None = None, eval_loss: float | None = None,
               lr: float | None = None, tokens_per_s: float | None = None, peak_memory: int | None = None,
               margin: float | None = None, accuracy: float | None = None) -> None:
        if loss is not None:
            self.fields["loss"] = f"{loss:.4f}"
        if eval_loss is not None:
            self.fields["eval"] = f"{eval_loss:.4f}"
        if lr is not None:
            self.fields["lr"] = f"{lr:.2e}"
        if tokens_per_s is not None:
            self.fields["tps"] = f"{tokens_per_s:,.0f}" + (
                f" ({self.world_size} ranks, {tokens_per_s / self.world_size:,.0f}/rank)" if self.world_size > 1 else "")
        if peak_memory is not None:
            self.fields["mem"] = human_bytes(peak_memory)
        if margin is not None and accuracy is not None:  # rewards/margins and rewards/accuracies (TRL's names)
            self.fields["pref"] = f"  margin {margin:+.3f} acc {accuracy:.0%}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **self.fields)
        else:
            f = self.fields
            self.lines.update(step, f"loss {f['loss']}  eval {f['eval']}  lr {f['lr']}  {f['tps']} tok/s  "
                                    f"mem {f['mem']}{f['pref']}")

    def print(self, *args, **kwargs) -> None:
        """Print above the bar (samples, warnings, checkpoint notes)."""
        self.console.print(*args, **kwargs)
