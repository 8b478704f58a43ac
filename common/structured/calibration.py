"""Calibration of a classifier's confidence: pure functions over (confidence, correct) pairs, and a plot.

Expected calibration error (ECE) uses equal-width bins over [0, 1] (the usual 10): the mean
over bins, weighted by their share of answers, of |accuracy - mean confidence|. Accuracy at
coverage answers "keep the most confident X% of messages, send the rest to a human: how
accurate is what we keep?".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import io

COVERAGES = (1.0, 0.9, 0.8, 0.5)  # shares of answers kept, most confident first


def reliability_bins(conf: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict[str, Any]]:
    """Per equal-width bin: its range, answer count, mean confidence and accuracy (None when empty)."""
    assert len(conf) == len(correct)
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        # The last bin is closed on the right, so a confidence of exactly 1.0 is counted.
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == hi)]
        out.append({"lo": lo, "hi": hi, "n": len(idx),
                    "confidence": sum(conf[i] for i in idx) / len(idx) if idx else None,
                    "accuracy": sum(bool(correct[i]) for i in idx) / len(idx) if idx else None})
    return out


def expected_calibration_error(conf: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float | None:
    n = len(conf)
    if not n:
        return None
    return sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(conf, correct, bins) if b["n"])


def accuracy_at_coverage(conf: Sequence[float], correct: Sequence[bool], coverage: float) -> dict[str, Any]:
    """Accuracy on the ``coverage`` share of answers with the highest confidence, and the threshold that keeps them."""
    n = len(conf)
    keep = max(1, math.ceil(coverage * n)) if n else 0
    order = sorted(range(n), key=lambda i: -conf[i])[:keep]
    return {"coverage": coverage, "kept": keep,
            "accuracy": sum(bool(correct[i]) for i in order) / keep if keep else None,
            "threshold": conf[order[-1]] if keep else None}


def calibration_report(conf: Sequence[float], correct: Sequence[bool], bins: int = 10) -> dict[str, Any]:
    """ECE, the reliability bins, accuracy at each of :data:`COVERAGES`, mean confidence and accuracy."""
    n = len(conf)
    return {"n": n, "ece": expected_calibration_error(conf, correct, bins),
            "mean_confidence": sum(conf) / n if n else None,
            "accuracy": sum(map(bool, correct)) / n if n else None,
            "bins": reliability_bins(conf, correct, bins),
            "at_coverage": [accuracy_at_coverage(conf, correct, c) for c in COVERAGES]}


def write_reliability_png(path: str | Path, report: dict[str, Any], title: str = "") -> Path:
    """A reliability diagram (accuracy per confidence bin against the diagonal), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = report["bins"]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    try:
        width = bins[0]["hi"] - bins[0]["lo"]
        used = [b for b in bins if b["n"]]
        ax.bar([b["lo"] for b in used], [b["accuracy"] for b in used], width=width, align="edge",
               edgecolor="black", color="tab:blue", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ece = report.get("ece")
        ax.set_title((title + "\n" if title else "") + (f"ECE {ece:.3f} on {report['n']} answers"
                                                          if ece is not None else "no answers"))
        ax.legend(loc="upper left", fontsize=8)
        hist.bar([b["lo"] for b in bins], [b["n"] for b in bins], width=width, align="edge", color="gray")
        hist.set_xlabel("confidence of the answered value")
        hist.set_ylabel("answers")
        hist.set_xlim(0, 1)
        fig.tight_layout()
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
