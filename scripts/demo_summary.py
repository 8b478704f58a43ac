"""Print the demo's before/after table and check its bar (intent and JSON >= 90%, GGUF within 2 points,
every answer decoded under the schema (``--format``) valid)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

BAR = 0.90  # intent accuracy and JSON validity the fine-tuned model must reach
GGUF_TOLERANCE = 0.02  # the exported GGUF may lose at most 2 points


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def metrics(path: Path) -> dict:
    """The scores of an ``llm-ft eval`` result (metrics.json keeps them under "metrics")."""
    return load(path)["metrics"]


def constrained(path: Path) -> tuple[dict, dict]:
    """The --format half of an eval: (metrics, confidence), empty when eval ran without --format."""
    c = load(path).get("constrained") or {}
    return c.get("metrics", {}), c.get("confidence", {})


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def main(run: str, gguf: str, seconds: str) -> int:
    run_dir = Path(run)
    run_eval, gguf_eval = run_dir / "eval" / "metrics.json", run_dir / "export" / "eval-gguf" / "metrics.json"
    (run_c, run_conf), (gguf_c, gguf_conf) = constrained(run_eval), constrained(gguf_eval)
    rows = {
        "base": metrics(run_dir / "eval-base" / "metrics.json"),
        "fine-tuned": metrics(run_eval),
        "fine-tuned + format": run_c,
        "GGUF": metrics(gguf_eval),
        "GGUF + format": gguf_c,
    }
    confidence = {"fine-tuned + format": run_conf, "GGUF + format": gguf_conf}
    summary = load(run_dir / "summary.json")
    keys = [("intent_accuracy", "intent acc"), ("parse_rate", "JSON parse"), ("schema_valid_rate", "schema valid"),
            ("exact_match", "exact match"), ("intent_macro_f1", "macro-F1"), ("field_accuracy", "field acc")]
    table = Table(title=f"before / after on data/test.jsonl ({rows['fine-tuned'].get('n', '?')} rows)",
                  caption=f"GGUF = {gguf} through llama.cpp; + format = decoding constrained to data/schema.json "
                  "(Ollama's format); ECE and accuracy at 90% coverage from the intent's probabilities")
    table.add_column("model")
    for _, label in keys:
        table.add_column(label, justify="right")
    table.add_column("ECE", justify="right")
    table.add_column("acc@90%", justify="right")
    for name, m in rows.items():
        if not m:
            continue
        conf = confidence.get(name) or {}
        at90 = next((a["accuracy"] for a in conf.get("at_coverage", []) if a["coverage"] == 0.9), None)
        table.add_row(name, *(pct(m.get(k)) for k, _ in keys),
                      "-" if conf.get("ece") is None else f"{conf['ece']:.3f}", pct(at90))
    console = Console()
    if not console.is_terminal:  # a log file: keep the table's rows on one line each
        console = Console(width=200)
    console.print(table)
    console.print(f"training: {summary.get('steps')} steps, {summary.get('tokens_per_s')} tokens/s, "
                  f"{summary.get('train_time_s')} s; whole demo after set-up: {seconds} s")

    run_m, gguf_m = rows["fine-tuned"], rows["GGUF"]
    problems = []
    for k in ("intent_accuracy", "schema_valid_rate"):
        if run_m.get(k, 0) < BAR:
            problems.append(f"run {k} {run_m.get(k, 0):.3f} < {BAR}")
        if gguf_m.get(k, 0) < run_m.get(k, 0) - GGUF_TOLERANCE:
            problems.append(f"GGUF {k} {gguf_m.get(k, 0):.3f} is more than 2 points below the run")
    # data/schema.json ties slots to intents in anyOf branches, which llama.cpp's grammar (so Ollama's
    # format) and llguidance enforce: every constrained answer must fit the schema.
    for name in ("fine-tuned + format", "GGUF + format"):
        if rows[name] and rows[name].get("schema_valid_rate", 0) < 1.0:
            problems.append(f"{name}: {rows[name].get('schema_valid_rate', 0):.1%} schema-valid, not 100%")
    verify = run_dir / "export" / "verify.json"
    if verify.exists():
        console.print(f"verification report: {verify}")
    modelfile = run_dir / "export" / "Modelfile"
    schema = run_dir / "export" / "schema.json"
    console.print(f"\nnext: [bold]ollama create intent -f {modelfile}[/bold]  then  ollama run intent --format "
                  f"\"$(cat {schema})\" \"set a timer for 5 minutes\"")
    if problems:
        console.print("[red]demo bar not met:[/red] " + "; ".join(problems))
        return 1
    console.print("[green]demo bar met[/green]: intent accuracy and schema validity >= 90%, GGUF within 2 points, "
                  "every constrained answer schema-valid")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
