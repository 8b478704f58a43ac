"""``llm-ft eval``: generate answers for a test split and score them.

JSON answers (--json-schema is given, or every expected answer parses as JSON) get
parse rate, schema validity, exact match, per-field and intent metrics, a confusion
matrix and every wrong answer in ``errors.jsonl``. Free-text answers get the eval loss,
perplexity and sample outputs. Any target works the same way: a base model, a run
(base + adapter, unmerged), a merged directory or an exported GGUF in llama.cpp, so the
cost of each step (fine-tuning, merging, quantising) is a number. ``--compare`` puts
several side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common import io
from common.backends import BackendName
from common.command import main_for, make_parser
from common.config import opt, register
from common.errors import UserError
from common.evaluate import metrics as M
from common.evaluate import report
from common.prompts import TEMPLATE_NAMES
from common.rows import Row, Text

DEFAULT_TEST = "data/test.jsonl"


@register
@dataclass
class EvalConfig:
    target: str = opt(help="what to evaluate: a run directory, a model (Hub id, HF or merged directory, "
                      "'default') or a .gguf file", positional=True)
    data: str | None = opt(None, f"test file (JSONL) (default: the run's test split, else {DEFAULT_TEST})")
    compare: list[str] = opt(factory=list, help="other runs, models or .gguf files to evaluate on the same data "
                             "and show side by side (also written to eval/compare.md)")
    limit: int | None = opt(None, "evaluate only the first N rows", min=1)
    batch_size: int = opt(8, "prompts generated together (torch batches them with left padding)", min=1)
    max_new_tokens: int | None = opt(None, "longest answer generated, in tokens (default: twice the longest "
                                        "expected answer + 16, so a rambling model cannot stall the eval; 256 "
                                        "when the data has no answers)", min=1)
    temperature: float = opt(0.0, "sampling temperature; 0 is greedy (reproducible)", min=0)
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability", gt=0, max=1)
    seed: int = opt(0, "random seed for sampling (temperature > 0)", min=0)
    task: Literal["auto", "json", "text"] = opt("auto", "how to score answers; auto = json when --json-schema is "
                                                "given or every expected answer parses as JSON, else text")
    json_schema: str | None = opt(None, "JSON schema answers must satisfy (default: schema.json beside the data)")
    format: str | None = opt(None, "also decode under a JSON schema, as Ollama's format does, and report free and "
                             "constrained decoding side by side, with the enum field's confidence and calibration: "
                             "'schema' (the data's schema.json) or a .json file")
    threshold: float | None = opt(None, "with --format: also score the answers with an enum value below this "
                                        "probability turned into the schema's fallback value (e.g. unknown)")
    system_prompt_file: str | None = opt(None, "system prompt for targets without their own (runs use theirs); "
                                            "default: the evaluated run's, else ./system_prompt.txt if present; "
                                            "'' for none")
    chat_template: str | None = opt(None, f"override the chat template: {TEMPLATE_NAMES} or a .jinja file")
    backend: BackendName = opt("auto", "engine for runs and models (GGUF files always use "
                                                  "llama.cpp); auto = the run's backend, else MLX on Apple "
                                                  "Silicon, else torch")
    tokenizer: str | None = opt(None, "Hugging Face tokenizer directory whose chat template renders prompts for "
                                   "a GGUF (default: the run's base model for RUN/export/*.gguf, else the GGUF's own)")
    n_ctx: int = opt(4096, "llama.cpp context length in tokens", min=1)
    loss: bool = opt(True, "also compute the eval loss and perplexity (teacher-forced, on the answers)")
    samples: int = opt(5, "sample outputs to show and keep in metrics.json", min=0)
    out: str | None = opt(None, "output directory (default: RUN/eval for a run, RUN/export/eval-<stem> for its GGUFs, "
                             "else runs/eval-<name>)")
    pairs: str | None = opt(None, "write a preference pair (chosen = expected, rejected = the answer) for each wrong "
                               "answer to this JSONL file: train on it with --method dpo --init-adapter RUN")


# ---------------------------------------------------------------------------
# inputs


def default_data(target) -> Path:
    """The run's test split (``test.jsonl`` in one of its data directories), else data/test.jsonl."""
    from common.data import parse_source
    from common.run_dir import RunDir

    if target.run_dir is not None:
        for spec in RunDir(target.run_dir).config().get("data") or []:
            path, _ = parse_source(str(spec))
            for name in ("test.jsonl", "test.json"):
                if path.is_dir() and (path / name).is_file():
                    return path / name
    return Path(DEFAULT_TEST)


def load_rows(path: Path, limit: int | None) -> list[Row]:
    from common.data import load_file

    if not path.is_file():
        raise UserError(f"{path}: test data not found (pass --data FILE)")
    rows, lint = load_file(path)
    lint.raise_if_errors(str(path))
    if not rows:
        raise UserError(f"{path}: no rows to evaluate")
    return rows[:limit] if limit else rows


def split_row(row: Row) -> tuple[list[dict], str | None]:
    """(prompt messages, expected answer) of a conversation: the last assistant turn is the answer."""
    if isinstance(row, Text):
        return [], None
    msgs = list(row.messages)
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    return msgs, None


def choose_task(cfg: EvalConfig, rows: list[Row], path: Path, explicit_schema: bool) -> str:
    """json or text: json when asked (--task json, --json-schema), or when every row ends with a JSON answer."""
    answers = [(row, split_row(row)[1]) for row in rows]
    missing = [f"{row.source or path}: no assistant answer to compare with" for row, a in answers if a is None]
    bad = [f"{row.source or path}: expected answer is not JSON: {a[:60]!r}" for row, a in answers
           if a is not None and not M.parse_json(a)[0]]
    if cfg.task == "json" or (cfg.task == "auto" and explicit_schema):
        if missing or bad:
            raise UserError(f"{path}: JSON scoring needs every row to end with a JSON answer", missing + bad)
        return "json"
    if cfg.task == "auto" and not missing and not bad:
        return "json"
    return "text"


def system_prompt_for(cfg: EvalConfig, main_target) -> str | None:
    """The prompt for targets without their own: the flag, else the main run's, else ./system_prompt.txt."""
    from common.prompts import load_system_prompt

    if cfg.system_prompt_file is not None:
        return load_system_prompt(cfg.system_prompt_file) or ""
    if main_target.system_prompt is not None:
        return main_target.system_prompt
    return load_system_prompt("system_prompt.txt") if Path("system_prompt.txt").is_file() else ""


def out_dir_for(target, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if target.kind == "run":
        return target.run_dir / "eval"
    if target.kind == "gguf" and target.run_dir is not None:  # one folder per export (f16, q8_0, ...)
        return target.gguf_file.parent / f"eval-{target.gguf_file.stem}"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in target.name)
    return Path("runs") / f"eval-{safe}"


# ---------------------------------------------------------------------------
# one target


def answer_budget(gen, expected: list[str | None]) -> int:
    """Tokens to generate: twice the longest expected answer plus 16 (EOT and slack), capped at 1024."""
    lengths = [len(gen.formatter.tokenizer.encode(a, add_special_tokens=False)) for a in expected if a]
    if not lengths:
        return 256
    return min(1024, 2 * max(lengths) + 16)


@contextlib.contextmanager
def progress_bar(label: str, total: int):
    """A progress bar on stderr (on a log, a line now and then with elapsed and ETA); yields ``advance(n)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from common.train.progress import LogLines

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    lines = None if console.is_terminal else LogLines(label, total, console, lines=10)
    done = 0
    with Progress(*columns, console=console, transient=True, disable=lines is not None) as progress:
        task = progress.add_task(label, total=total)

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            progress.advance(task, n)
            if lines is not None:
                lines.update(done)

        yield advance


def generate_all(gen, prompts: list[list[dict]], cfg: EvalConfig, label: str) -> list[str]:
    """Answers for every prompt, batch by batch, with a progress bar on stderr."""
    answers: list[str] = []
    with progress_bar(f"generating ({label})", len(prompts)) as advance:
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start:start + cfg.batch_size]
            answers += gen.generate_batch(batch, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                          top_p=cfg.top_p, seed=cfg.seed)
            advance(len(batch))
    return answers


def eval_loss(gen, rows: list[Row]) -> tuple[float | None, float | None, int, str | None]:
    """(mean loss in nats/token, perplexity, target tokens, note) on rows with something to learn."""
    examples = [gen.formatter.encode(r) for r in rows if isinstance(r, Text) or split_row(r)[1] is not None]
    got = gen.loss(examples) if examples else None
    if got is None:
        return None, None, 0, "n/a: this engine does not compute a loss" if examples else "n/a: no answers"
    total, count = got
    return (total / count if count else None), M.perplexity(total, count), count, None


def evaluate_target(target, cfg: EvalConfig, rows: list[Row], task: str, schema: dict | None,
                    default_prompt: str | None, data_path: Path, out_dir: Path, fmt=None) -> dict[str, Any]:
    """Load one target, generate, score, and write metrics.json (+ errors.jsonl, confusion.png) to ``out_dir``."""
    from rich.console import Console

    from common.generation import load_generator

    console = Console(stderr=True)
    prompt = None if target.system_prompt is not None else default_prompt
    gen = load_generator(target, backend=cfg.backend, system_prompt=prompt, chat_template=cfg.chat_template,
                         n_ctx=cfg.n_ctx)
    try:
        pairs = [split_row(r) for r in rows]
        if task == "json":
            chosen = list(range(len(rows)))
        else:  # free text: the loss covers the split; a few answers show what the model writes
            chosen = [i for i, (msgs, _) in enumerate(pairs) if msgs][: cfg.samples]
        if cfg.max_new_tokens is None:
            cfg = dataclasses.replace(cfg, max_new_tokens=answer_budget(gen, [pairs[i][1] for i in chosen]))
        before, t0 = gen.new_tokens, time.perf_counter()
        produced = generate_all(gen, [pairs[i][0] for i in chosen], cfg, target.name)
        seconds = time.perf_counter() - t0
        new_tokens = gen.new_tokens - before
        structured = None
        if fmt is not None and task == "json":  # the same rows again, decoded under the schema
            from common.structured.evaluate import constrained_eval

            structured = constrained_eval(gen, [pairs[i][0] for i in chosen], [pairs[i][1] for i in chosen], fmt,
                                          schema, lambda g, p: generate_all(g, p, cfg, f"{target.name}, --format"),
                                          out_dir, target.name, cfg.threshold,
                                          progress=lambda n: progress_bar(f"confidence ({target.name})", n))
        loss, ppl, loss_tokens, loss_note = eval_loss(gen, rows) if cfg.loss else (None, None, 0, "not computed")
        describe = gen.describe()
    finally:
        gen.close()

    result: dict[str, Any] = {
        "target": target.spec, "generator": describe, "data": str(data_path), "task": task,
        "settings": {k: getattr(cfg, k) for k in ("limit", "batch_size", "max_new_tokens", "temperature", "top_p",
                                                   "seed")},
        "timing": {"generation_s": round(seconds, 3), "new_tokens": new_tokens,
                   "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None},
    }
    if task == "json":
        expected = [pairs[i][1] for i in chosen]
        scored = M.json_report(expected, produced, schema=schema)
        result["metrics"] = scored["metrics"]
        result["per_field"], result["per_class"] = scored["per_field"], scored.get("per_class", {})
        if "confusion" in scored:
            result["confusion"] = scored["confusion"]
        errors = []
        for i, verdict, answer in zip(chosen, scored["examples"], produced, strict=True):
            if not verdict["exact"]:
                msgs = pairs[i][0]
                errors.append({"source": str(rows[i].source) if rows[i].source else None, "prompt": rows[i].user_text(),
                               "messages": msgs if len(msgs) > 1 else None, "expected": pairs[i][1],
                               "produced": answer, "problems": verdict["problems"]})
        result["metrics"]["errors"] = len(errors)
        report.write_jsonl(out_dir / "errors.jsonl", errors)
        if "confusion" in scored:
            c = scored["confusion"]
            report.write_confusion_png(out_dir / "confusion.png", c["labels"], c["matrix"], title=target.name)
    else:
        result["metrics"] = M.text_report([pairs[i][1] for i in chosen], produced)
        result["metrics"]["n"] = len(rows)
    result["metrics"].update(eval_loss=loss, perplexity=ppl, eval_tokens=loss_tokens)
    if loss_note:
        result["loss_note"] = loss_note
    result["samples"] = [{"prompt": rows[i].user_text(), "expected": pairs[i][1], "produced": answer}
                         for i, answer in list(zip(chosen, produced, strict=True))[: cfg.samples]]
    if structured is not None:
        result["constrained"] = structured
    result["out_dir"] = str(out_dir)
    io.write_json(out_dir / "metrics.json", result)

    results = Console(highlight=False) if Console().is_terminal else Console(width=200, highlight=False)
    results.print(report.metrics_table(result))  # results on stdout; progress and notes on stderr
    if structured is not None:
        results.print(report.decoding_table(result))
        for note in structured["notes"]:
            console.print(f"[yellow]note:[/] {note}; every answer is still checked against the whole schema")
    if "confusion" in result and len(result["confusion"]["labels"]) <= 20:
        results.print(report.confusion_table(result["confusion"]["labels"], result["confusion"]["matrix"]))
    if task == "text":
        for s in result["samples"]:
            results.print(f"[bold]prompt:[/] {s['prompt']}\n[bold]answer:[/] {s['produced']}\n")
    print(f"wrote {out_dir / 'metrics.json'}")  # the result's path on stdout, the log on stderr
    return result


# ---------------------------------------------------------------------------
# the command


def run(cfg: EvalConfig) -> int:
    from common.data import find_schema, load_schema
    from common.generation import resolve_target
    from common.run_dir import RunDir

    targets = [resolve_target(spec, tokenizer=cfg.tokenizer) for spec in [cfg.target, *cfg.compare]]
    data_path = Path(cfg.data) if cfg.data else default_data(targets[0])
    rows = load_rows(data_path, cfg.limit)
    schema_path = find_schema([str(data_path)], cfg.json_schema)
    schema = load_schema(schema_path).schema if schema_path else None
    from common.structured.classify import check_threshold
    from common.structured.schema import resolve_format

    fmt = resolve_format(cfg.format, data_schema=schema_path, target=targets[0])
    check_threshold(cfg.threshold, fmt)
    if schema is None and fmt is not None:  # --format FILE with no schema beside the data: score against it
        schema = fmt.schema
    task = choose_task(cfg, rows, data_path, explicit_schema=bool(cfg.json_schema or cfg.format))
    if task == "text":
        schema = None
        if cfg.pairs:
            raise UserError("--pairs needs answers scored right or wrong (a JSON task: --task json or a --json-schema)")
    default_prompt = system_prompt_for(cfg, targets[0])
    if cfg.pairs:  # before the generation, not after it
        io.check_writable(cfg.pairs, "--pairs")

    out_dirs: list[Path] = []
    for i, t in enumerate(targets):
        d = out_dir_for(t, cfg.out if i == 0 else None)
        if i > 0 and t.kind == "model":  # --compare default: beside the main results, not ./runs/eval-default
            d = out_dirs[0] / "compare" / d.name.removeprefix("eval-")
        while d.resolve() in [o.resolve() for o in out_dirs]:  # two targets of the same name
            d = d.with_name(d.name + "-2")
        out_dirs.append(d)
    results = [evaluate_target(t, cfg, rows, task, schema, default_prompt, data_path, d, fmt)
               for t, d in zip(targets, out_dirs, strict=True)]
    if cfg.pairs:
        from rich.console import Console

        from common.evaluate.pairs import write_pairs

        written, skipped = write_pairs(out_dirs[0] / "errors.jsonl", Path(cfg.pairs))
        Console(stderr=True).print(f"wrote {written} preference pairs to {cfg.pairs}"
                                   + (f" ({skipped} wrong answers were empty: no pair)" if skipped else ""))
    if cfg.compare:
        table_rows = [row for t, result in zip(targets, results, strict=True)
                      for row in report.compare_rows(result, RunDir(t.run_dir).summary() if t.kind == "run" else {})]
        settings = (f"{len(rows)} rows, greedy" if cfg.temperature == 0 else f"{len(rows)} rows, "
                    f"temperature {cfg.temperature}, top-p {cfg.top_p}, seed {cfg.seed}")
        md = report.compare_markdown(table_rows, data=str(data_path), settings=settings)
        path = out_dirs[0] / "compare.md"
        io.write_text(path, md)
        from rich.console import Console

        console = Console()  # the comparison is a result: stdout
        if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
            console = Console(width=200)
        console.print(report.compare_table(table_rows))
        print(f"wrote {path}")
    _next(targets[0])
    return 0


def _next(target) -> None:
    """What to do after an eval: export a run (or the GGUF's run), else train on the data."""
    from rich.console import Console

    where = target.run_dir if target.kind == "run" else None
    hint = f"llm-ft export {where}" if where else ("llm-ft chat " + target.spec if target.kind == "gguf"
                                                   else f"llm-ft train --model {target.spec}")
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"next: {hint}")


def build_parser():
    parser = make_parser("eval", "Generate answers for a test split and score them: JSON metrics (parse rate, "
                         "schema, exact match, fields, intent F1, confusion) or eval loss for free text.", EvalConfig)
    for action in parser._actions:  # --compare A B C as well as --compare A,B,C
        if action.dest == "compare":
            action.nargs = "+"
            action.metavar = "OTHER"
    return parser


def main(argv=None) -> int:
    return main_for(build_parser, EvalConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
