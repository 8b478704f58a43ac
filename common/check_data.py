"""``llm-ft check-data PATH...``: lint data files and show token statistics.

Every problem is reported at once as ``file:line[:col]: problem``; errors exit 2,
warnings alone exit 0. No model weights are loaded: only the tokenizer, for token
statistics, and a tokenizer that cannot be had turns the statistics into a warning.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from common.command import main_for, make_parser
from common.config import opt, register
from common.data import LintReport, Splits, load_splits
from common.errors import UserError
from common.options import DataOptions, ModelOptions
from common.prompts import encode_split
from common.rows import Conversation

MAX_SHOWN = 50  # problems printed before "... and N more"


@register
@dataclass
class CheckDataConfig(ModelOptions, DataOptions):
    paths: list[str] = opt(factory=list, positional=True,
                           help="data directories or files, each PATH or PATH:N (N rows sampled) "
                                "(default: the --data option, i.e. data)")
    tokens: bool = opt(True, "token statistics per split (loads only the --model's tokenizer; "
                             "--no-tokens skips them)")


@dataclass
class DataCheck:
    """What check-data found: the splits (with their report), token statistics and intents."""

    splits: Splits
    stats: dict[str, dict[str, int]] | None  # split -> encode_split stats; None when skipped
    intents: dict[str, Counter]  # split -> intent -> rows (answers that are JSON with an "intent")
    tokens_skipped: str | None = None  # why there are no token statistics
    system_prompt_path: str | None = None  # the system prompt file used (absolute), if any

    @property
    def report(self) -> LintReport:
        return self.splits.report


def _tokenizer(cfg: CheckDataConfig):
    from common.models import load_tokenizer, resolve_model

    resolved = resolve_model(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return load_tokenizer(resolved.path)


def intents(rows) -> Counter:
    """Count the ``intent`` of final answers that are JSON objects carrying one."""
    found: Counter = Counter()
    for row in rows:
        if not isinstance(row, Conversation) or row.messages[-1]["role"] != "assistant":
            continue
        try:
            answer = json.loads(row.messages[-1]["content"])
        except json.JSONDecodeError:
            continue
        if isinstance(answer, dict) and isinstance(answer.get("intent"), str):
            found[answer["intent"]] += 1
    return found


def _encoder(rows):
    """Preference pairs are tokenized as pairs (common.preference_data), other rows as examples."""
    from common.preference_data import Preference, encode_pairs

    return encode_pairs if any(isinstance(r, Preference) for r in rows) else encode_split


def _token_stats(cfg: CheckDataConfig, splits: Splits, tokenizer, system_prompt: str | None) -> dict:
    from common.prompts import ChatFormatter

    report = splits.report
    formatter = ChatFormatter(tokenizer, template=cfg.chat_template, system_prompt=system_prompt,
                              train_on_prompt=cfg.train_on_prompt)
    stats = {}
    for name, rows in splits.items():
        if not rows:
            continue
        encode_split = _encoder(rows)
        try:
            _, stats[name] = encode_split(rows, formatter, cfg.max_seq_length, cfg.overlong, progress=True)
        except UserError as exc:  # --overlong error: list the rows, still show the statistics
            for problem in exc.problems:
                where, _, what = problem.partition(": ")
                report.error(where, f"{what} (--overlong error)")
            _, stats[name] = encode_split(rows, formatter, cfg.max_seq_length, "drop")
        s = stats[name]
        if s["overlong"] and cfg.overlong != "error":
            done = "truncated" if cfg.overlong == "truncate" else "dropped"
            report.warning(name, f"{s['overlong']} rows are longer than max_seq_length={cfg.max_seq_length} "
                                 f"and were {done} (--overlong)")
        if s["zero_supervised"]:
            report.warning(name, f"{s['zero_supervised']} rows have no supervised tokens left "
                                 "(answer cut off by truncation) and are skipped in training")
    return stats


def check(cfg: CheckDataConfig) -> DataCheck:
    """Load and lint the data, then compute token statistics if a tokenizer can be had."""
    from common.locate import load_for_data

    problems = LintReport()  # problems outside the data files
    system_prompt, prompt_path = None, None
    try:  # beside the data when not in the current directory (data/README.md: ../system_prompt.txt)
        system_prompt, prompt_path = load_for_data(cfg.system_prompt_file, cfg.paths or cfg.data)
    except UserError as exc:
        problems.error("", exc.render())
    tokenizer, skipped = None, None
    if not cfg.tokens:
        skipped = "--no-tokens"
    else:
        try:
            tokenizer = _tokenizer(cfg)
        except (UserError, ImportError, OSError) as exc:  # no model here: lint anyway
            skipped = exc.message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            problems.warning("", f"token statistics skipped: {skipped}")
    splits = load_splits(cfg.paths or cfg.data, valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                         schema=cfg.json_schema, tokenizer=tokenizer, max_seq_length=cfg.max_seq_length,
                         data_config=cfg.data_config)
    splits.report.problems[:0] = problems.problems
    stats = None
    if tokenizer is not None and splits.train:
        try:
            stats = _token_stats(cfg, splits, tokenizer, system_prompt)
        except UserError as exc:  # the chat template cannot render these rows
            splits.report.error("", exc.render())
    found = {name: intents(rows) for name, rows in splits.items()}
    return DataCheck(splits, stats, found, skipped, str(prompt_path) if prompt_path else None)


# ---------------------------------------------------------------------------
# output


def _formats(result: DataCheck, rows) -> str:
    names = sorted({result.report.formats.get(r.source.file, "?") for r in rows if r.source is not None})
    return ", ".join(names) or "-"


def print_result(result: DataCheck, console=None) -> None:
    """The per-split table, the intents table and the warnings (first 50, then a count)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    splits = result.splits
    table = Table(title="data (tokens per row: p50, p95, max)", title_justify="left")
    for col in ("split", "rows", "format", "p50", "p95", "max", "supervised", "zero-sup", "overlong"):
        table.add_column(col, justify="left" if col in ("split", "format") else "right")
    for name, rows in splits.items():
        label = f"{name} (from train)" if name == "valid" and splits.valid_from_train else name
        s = (result.stats or {}).get(name)
        tok = [str(s[k]) for k in ("tokens_p50", "tokens_p95", "tokens_max", "supervised_tokens",
                                   "zero_supervised", "overlong")] if s else ["-"] * 6
        table.add_row(label, str(len(rows)), _formats(result, rows), *tok)
    console.print(table)
    console.print(f"system prompt: {result.system_prompt_path or 'none'}", highlight=False, soft_wrap=True)
    if result.stats:
        limit = next(iter(result.stats.values()))["max_seq_length"]
        console.print(f"max_seq_length {limit}; tokens include the system prompt and chat template")
    elif result.tokens_skipped == "--no-tokens":  # other reasons are printed as a warning
        console.print(f"no token statistics ({result.tokens_skipped})")

    if any(result.intents.values()):
        names = sorted(set().union(*result.intents.values()),
                       key=lambda k: (-result.intents["train"][k], k))
        itable = Table(title="intents", title_justify="left")
        itable.add_column("intent")
        for name, _ in splits.items():
            itable.add_column(name, justify="right")
        for intent in names:
            itable.add_row(intent, *(str(result.intents[s][intent]) for s, _ in splits.items()))
        console.print(itable)

    warnings = result.report.warnings
    for w in warnings[:MAX_SHOWN]:
        console.print(f"[yellow]warning:[/] {w}", markup=True, soft_wrap=True)
    if len(warnings) > MAX_SHOWN:
        console.print(f"[yellow]warning:[/] ... and {len(warnings) - MAX_SHOWN} more")
    n_err = len(result.report.errors)
    summary = f"{n_err} error{'s' if n_err != 1 else ''}, {len(warnings)} warning{'s' if len(warnings) != 1 else ''}"
    console.print(f"[red]{summary}[/]" if n_err else f"[green]ok[/]: {summary}")


def run(cfg: CheckDataConfig) -> int:
    """Lint, print the report and raise a UserError listing every error (exit 2) if there is one."""
    result = check(cfg)
    print_result(result)
    result.report.raise_if_errors()
    return 0


def build_parser():
    return make_parser("check-data", "Lint data files (every row, every problem at once) and show token "
                       "statistics per split. Loads only the tokenizer, never model weights.", CheckDataConfig)


def main(argv: Any = None) -> int:
    return main_for(build_parser, CheckDataConfig, run, argv)
