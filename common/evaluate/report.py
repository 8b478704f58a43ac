"""Evaluation reports: rich tables for the terminal, a confusion-matrix PNG, markdown for comparisons."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import io

# (column title, key in a comparison row, format)
COMPARE_COLUMNS: list[tuple[str, str, str]] = [
    ("target", "name", "s"), ("kind", "kind", "s"), ("engine", "backend", "s"), ("decoding", "decoding", "s"),
    ("n", "n", "d"), ("parse", "parse_rate", "%"), ("schema", "schema_valid_rate", "%"), ("exact", "exact_match", "%"),
    ("intent acc", "intent_accuracy", "%"), ("intent F1", "intent_macro_f1", "3"), ("field acc", "field_accuracy", "%"),
    ("ECE", "ece", "3"), ("acc@90%", "acc_at_90", "%"),
    ("eval loss", "eval_loss", "4"), ("ppl", "perplexity", "2"), ("gen tok/s", "gen_tokens_per_s", "1"),
    ("train time", "train_time_s", "t"), ("peak mem", "peak_memory_bytes", "b"), ("train tok/s", "train_tokens_per_s", "1"),
]


def fmt(value: Any, kind: str) -> str:
    """One cell: percentages, fixed decimals, durations (s), byte sizes; missing values as '-'."""
    if value is None:
        return "-"
    if kind == "%":
        return f"{100 * value:.1f}%"
    if kind == "d":
        return str(int(value))
    if kind == "t":
        value = float(value)
        return f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"
    if kind == "b":
        value = float(value)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if value < 1024 or unit == "GiB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    if kind.isdigit():
        return f"{float(value):.{int(kind)}f}"
    return str(value)


def compare_row(result: dict[str, Any], summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flatten one evaluation (metrics.json content) and its run's summary.json into a table row."""
    m = result.get("metrics", {})
    s = summary or {}
    gen = result.get("generator", {})
    return {
        "name": gen.get("name", result.get("target")), "kind": gen.get("kind"), "backend": gen.get("backend"),
        "n": m.get("n"), "parse_rate": m.get("parse_rate"), "schema_valid_rate": m.get("schema_valid_rate"),
        "exact_match": m.get("exact_match"), "intent_accuracy": m.get("intent_accuracy"),
        "intent_macro_f1": m.get("intent_macro_f1"), "eval_loss": m.get("eval_loss"), "perplexity": m.get("perplexity"),
        "gen_tokens_per_s": result.get("timing", {}).get("tokens_per_s"),
        "train_time_s": s.get("train_time_s", s.get("wall_time_s")),
        "peak_memory_bytes": s.get("peak_memory_bytes"), "train_tokens_per_s": s.get("tokens_per_s"),
    }


def constrained_row(result: dict[str, Any]) -> dict[str, Any] | None:
    """The ``--format`` half of an evaluation as a comparison row (None without one)."""
    c = result.get("constrained")
    if not c:
        return None
    m, gen = c["metrics"], result.get("generator", {})
    conf = c.get("confidence") or {}
    at90 = next((a for a in conf.get("at_coverage", []) if a["coverage"] == 0.9), {})
    key = conf.get("field", "intent")
    return {"name": gen.get("name", result.get("target")), "kind": gen.get("kind"), "backend": gen.get("backend"),
            "decoding": "format", "n": m.get("n"), "parse_rate": m.get("parse_rate"),
            "schema_valid_rate": m.get("schema_valid_rate"), "exact_match": m.get("exact_match"),
            "intent_accuracy": m.get(f"{key}_accuracy"), "intent_macro_f1": m.get(f"{key}_macro_f1"),
            "field_accuracy": m.get("field_accuracy"), "ece": conf.get("ece"), "acc_at_90": at90.get("accuracy"),
            "gen_tokens_per_s": c.get("timing", {}).get("tokens_per_s")}


def compare_rows(result: dict[str, Any], summary: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row for free decoding, and one for ``--format`` when it was evaluated."""
    free = compare_row(result, summary)
    constrained = constrained_row(result)
    if constrained is None:
        return [free]
    free["decoding"] = "free"
    return [free, constrained]


def decoding_table(result: dict[str, Any]):
    """Free and constrained decoding side by side (and the --threshold row when there is one)."""
    from rich.table import Table

    rows = compare_rows(result)
    t = (result.get("constrained") or {}).get("thresholded")
    if t:
        m = t["metrics"]
        rows.append({"decoding": f"format, p<{t['threshold']:g} -> fallback ({t['fallbacks']})",
                     "parse_rate": m.get("parse_rate"), "schema_valid_rate": m.get("schema_valid_rate"),
                     "exact_match": m.get("exact_match"), "intent_accuracy": m.get("intent_accuracy"),
                     "intent_macro_f1": m.get("intent_macro_f1"), "field_accuracy": m.get("field_accuracy")})
    keep = ("decoding", "parse_rate", "schema_valid_rate", "intent_accuracy", "intent_macro_f1", "field_accuracy",
            "exact_match", "ece", "acc_at_90")
    cols = [c for c in COMPARE_COLUMNS if c[1] in keep and any(r.get(c[1]) is not None for r in rows)]
    cols.sort(key=lambda c: keep.index(c[1]))
    table = Table(title=f"free vs constrained decoding ({result.get('generator', {}).get('name')})")
    for title, _, kind in cols:
        table.add_column(title, justify="left" if kind == "s" else "right")
    for r in rows:
        table.add_row(*(fmt(r.get(key), kind) for _, key, kind in cols))
    return table


def _used_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    # Drop columns no row has a value for (a free-text split has no intent, base models no training time).
    return [c for c in COMPARE_COLUMNS if c[1] == "name" or any(r.get(c[1]) is not None for r in rows)]


def compare_markdown(rows: Sequence[dict[str, Any]], *, data: str = "", settings: str = "") -> str:
    """A markdown table of several evaluations side by side (pure)."""
    cols = _used_columns(rows)
    lines = ["# Evaluation comparison", ""]
    if data:
        lines += [f"Data: `{data}`" + (f"; {settings}" if settings else ""), ""]
    lines.append("| " + " | ".join(title for title, _, _ in cols) + " |")
    lines.append("|" + "|".join("---" if kind == "s" else "---:" for _, _, kind in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(key), kind).replace("|", "\\|") for _, key, kind in cols) + " |")
    return "\n".join(lines) + "\n"


def compare_table(rows: Sequence[dict[str, Any]]):
    from rich.table import Table

    cols = _used_columns(rows)
    table = Table(title="comparison")
    for title, _, kind in cols:
        table.add_column(title, justify="left" if kind == "s" else "right")
    for r in rows:
        table.add_row(*(fmt(r.get(key), kind) for _, key, kind in cols))
    return table


def metrics_table(result: dict[str, Any]):
    """The headline numbers of one evaluation, and per-field accuracy."""
    from rich.table import Table

    m = result["metrics"]
    table = Table(title=f"{result['generator']['name']} ({result['generator']['backend']}) on {m.get('n')} rows")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("parse rate", "parse_rate", "%"), ("schema valid", "schema_valid_rate", "%"),
            ("exact match", "exact_match", "%"), ("intent accuracy", "intent_accuracy", "%"),
            ("intent macro-F1", "intent_macro_f1", "3"), ("field accuracy", "field_accuracy", "%"), ("eval loss (nats/token)", "eval_loss", "4"),
            ("perplexity", "perplexity", "2")]
    for title, key, kind in rows:
        if m.get(key) is not None:
            table.add_row(title, fmt(m[key], kind))
    if m.get("eval_loss") is None and result.get("loss_note"):
        table.add_row("eval loss", result["loss_note"])
    for name, v in result.get("per_field", {}).items():
        table.add_row(f"field {name}", f"{fmt(v['accuracy'], '%')} of {v['support']}")
    t = result.get("timing", {})
    if t.get("tokens_per_s") is not None:
        table.add_row("generation", f"{t['new_tokens']} tokens, {t['tokens_per_s']:.1f} tok/s")
    return table


def confusion_table(labels: Sequence[str], matrix: Sequence[Sequence[int]]):
    """Rows: expected class; columns: predicted class; the diagonal in green."""
    from rich.table import Table

    table = Table(title="confusion (rows: expected, columns: predicted)")
    table.add_column("")
    for i in range(len(labels)):
        table.add_column(str(i), justify="right")
    for i, (label, row) in enumerate(zip(labels, matrix, strict=True)):
        cells = [("[green]" if i == j else "[red]" if v else "[dim]") + str(v) for j, v in enumerate(row)]
        table.add_row(f"{i} {label}", *cells)
    return table


def write_confusion_png(path: str | Path, labels: Sequence[str], matrix: Sequence[Sequence[int]],
                        title: str = "") -> Path | None:
    """A confusion-matrix heat map (matplotlib, Agg backend: no display needed), written atomically;
    None (skipped, with a note) without matplotlib."""
    from common.train.plot import plotting_available

    if not plotting_available():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = max(4.0, 0.45 * n + 2.5)  # inches: room for one readable label per class
    fig, ax = plt.subplots(figsize=(size + 1, size))
    try:
        image = ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(n), labels=labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels=labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("expected")
        ax.set_title(title or "confusion matrix")
        top = max((max(r) for r in matrix), default=0)
        for i in range(n):
            for j in range(n):
                if matrix[i][j]:
                    ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=7,
                            color="white" if matrix[i][j] > top / 2 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Records as JSON lines, written atomically (an empty file when there are none)."""
    io.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)
