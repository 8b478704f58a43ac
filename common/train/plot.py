"""``loss.png``: train and eval loss against the optimizer step, from metrics.jsonl.

A DPO/ORPO run gets a second panel: the rewards of chosen and rejected answers and their margin.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.io import atomic_path


def read_metrics(path: Path) -> list[dict]:
    """The events of a metrics.jsonl; a torn last line (a killed run) is ignored."""
    events = []
    if not Path(path).exists():
        return events
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


PLOTS_NOTE = "note: plots skipped (matplotlib is not installed: pip install 'llm-ft[plots]')"
_noted = False


def plotting_available() -> bool:
    """matplotlib is an optional extra: without it plots are skipped with one note on stderr."""
    global _noted
    import importlib.util
    import sys

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if not _noted:
        print(PLOTS_NOTE, file=sys.stderr)
        _noted = True
    return False


def plot_loss(metrics_file: Path, out_png: Path, title: str = "") -> None:
    """Draw the curves with matplotlib's Agg backend (no display needed); skipped without matplotlib."""
    if not plotting_available():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_metrics(metrics_file)
    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train" and e.get("loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in events if e.get("event") == "eval"]
    best = [(e["step"], e["eval_loss"]) for e in events if e.get("event") == "eval" and e.get("best")]
    rewards = {k: [(e["step"], e[k]) for e in events if e.get("event") == "train" and e.get(k) is not None]
               for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    if any(rewards.values()):
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True)
        for k, points in rewards.items():
            if points:
                ax2.plot(*zip(*points, strict=True), label=k, linewidth=1)
        ax2.axhline(0, color="grey", linewidth=0.5)
        ax2.set_ylabel("reward (nats)")
        ax2.grid(alpha=0.3)
        ax2.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1, alpha=0.8)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval", linewidth=1.5, markersize=3)
    if best:
        ax.plot(*best[-1], "*", markersize=12, color="tab:red", label=f"best (step {best[-1][0]})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/pair)" if any(rewards.values()) else "loss (nats/token)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
