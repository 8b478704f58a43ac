"""The Python API: each function builds its subcommand's config dataclass from keyword
arguments (the same defaults, coercion and validation as the flags), calls the
subcommand's own ``run(cfg)`` and returns what it wrote as a result object.

A keyword is a flag's name with underscores (``max_seq_length=512`` for
``--max-seq-length 512``). ``config="run.yaml"`` and ``env_file=".env"`` layer as on the
command line. Switches that run code or expose the machine (``trust_remote_code``) are
taken from the call only, never from a YAML or .env file.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import config as C
from common.errors import UserError, nearest
from llm_ft.results import ClassifyResult, EvalResult, PushResult, TrainResult

if TYPE_CHECKING:
    from common.export.cmd import ExportResult

# Options only an API call (or a command-line flag) may turn on.
CALL_ONLY = ("trust_remote_code",)
# HF / Unsloth / TRL spellings, mapped to ours for the "did you mean" hint.
ALIASES = {"learning_rate": "lr", "lora_rank": "lora_r", "r": "lora_r", "num_train_epochs": "epochs",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "output_dir": "out", "model_name": "model", "model_name_or_path": "model",
           "max_length": "max_seq_length", "target_modules": "targets", "logging_steps": "log_every",
           "eval_steps": "eval_every", "save_steps": "save_every", "gradient_checkpointing": "grad_checkpoint",
           "lr_scheduler_type": "schedule", "dataset": "data", "train_file": "data"}


def build_config(cls, kwargs: dict[str, Any], *, config: str | None = None, env_file: str | None = None):
    """``cls`` from keyword arguments, through the CLI's own resolution and validation."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        problems = []
        for k in unknown:
            hint = ALIASES.get(k) if ALIASES.get(k) in names else nearest(k, sorted(names))
            problems.append(f"{k}: unknown option" + (f" (did you mean {hint!r}?)" if hint else ""))
        raise UserError(f"{cls.__name__}: invalid arguments", problems)
    cli = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    for k, v in list(cli.items()):
        if isinstance(v, Path):
            cli[k] = str(v)
        elif isinstance(v, list):
            cli[k] = [str(x) if isinstance(x, Path) else x for x in v]
    cfg = C.resolve(cls, cli, config, env_file)
    safe = {k: bool(kwargs.get(k, False)) for k in CALL_ONLY if k in names}
    return dataclasses.replace(cfg, **safe) if safe else cfg


def _events(path: Path) -> list[dict[str, Any]]:
    from common.train.plot import read_metrics

    return read_metrics(path)


def check_data(*paths: str | Path, config: str | None = None, env_file: str | None = None, **options: Any):
    """Lint data and compute token statistics (``llm-ft check-data``); returns common.check_data.DataCheck.

    Raises :class:`LLMFTError` listing every error, as the command does.
    """
    from common.check_data import CheckDataConfig, check

    if paths:
        options["paths"] = [str(p) for p in paths]
    cfg = build_config(CheckDataConfig, options, config=config, env_file=env_file)
    result = check(cfg)
    result.report.raise_if_errors()
    return result


def train(*, config: str | None = None, env_file: str | None = None, **options: Any) -> TrainResult:
    """Fine-tune with LoRA (``llm-ft train``); returns the run directory, adapter, summary and metrics."""
    from common.options import TrainConfig
    from common.train import cmd
    from common.train.cmd import default_run_dir

    cfg = build_config(TrainConfig, options, config=config, env_file=env_file)
    if cfg.out is None:  # chosen here so the result can name it
        cfg = dataclasses.replace(cfg, out=str(default_run_dir(cfg.model)))
    status = cmd.run(cfg)
    run_dir = Path(cfg.out)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return TrainResult(run_dir=run_dir, adapter_dir=run_dir / "adapter", summary=summary,
                       metrics=_events(run_dir / "metrics.jsonl"), status=status)


def evaluate(target: str | Path, *, config: str | None = None, env_file: str | None = None,
             **options: Any) -> EvalResult:
    """Score a run, model or GGUF on a test split (``llm-ft eval``); returns metrics.json's content."""
    from common.evaluate import cmd
    from common.generation import resolve_target

    options["target"] = str(target)
    cfg = build_config(cmd.EvalConfig, options, config=config, env_file=env_file)
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=str(cmd.out_dir_for(resolve_target(cfg.target, tokenizer=cfg.tokenizer),
                                                               None)))
    cmd.run(cfg)
    out = Path(cfg.out)
    data = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return EvalResult(out_dir=out, metrics=data.get("metrics", {}), report=data)


def merge(run: str | Path, *, config: str | None = None, env_file: str | None = None, **options: Any) -> Path:
    """Merge a run's adapter into its base weights (``llm-ft merge``); returns the model directory."""
    from common.export import merge_cmd

    options["run"] = str(run)
    return Path(merge_cmd.run(build_config(merge_cmd.MergeConfig, options, config=config, env_file=env_file)))


def export(source: str | Path, *, config: str | None = None, env_file: str | None = None,
           **options: Any) -> ExportResult:
    """Write a GGUF and an Ollama Modelfile, verified in llama.cpp (``llm-ft export``).

    A verification that fails raises :class:`LLMFTError` (the command exits 1), after writing.
    """
    from common.export import cmd

    options["source"] = str(source)
    got = cmd.run(build_config(cmd.ExportConfig, options, config=config, env_file=env_file))
    if not got.ok:
        raise UserError(f"{got.gguf}: verification failed (see {got.gguf.with_name('verify.json')})")
    return got


def chat(target: str | Path, prompt: str, *, config: str | None = None, env_file: str | None = None,
         **options: Any) -> str:
    """One answer from a run, model or GGUF (``llm-ft chat --prompt``)."""
    from common import chat as chat_cmd

    options.update(target=str(target), prompt=prompt)
    cfg = build_config(chat_cmd.ChatConfig, options, config=config, env_file=env_file)
    out = io.StringIO()
    chat_cmd.run(cfg, stdin=io.StringIO(""), stdout=out)
    return out.getvalue().removesuffix("\n")


def classify(target: str | Path, texts: str | list[str], *, config: str | None = None, env_file: str | None = None,
             json_schema: str | Path | None = None, **options: Any) -> ClassifyResult | list[ClassifyResult]:
    """Answer each text greedily and parse the answer as JSON (checked against ``json_schema`` if given).

    One text gives one :class:`ClassifyResult`, a list gives a list. Generation options are
    those of ``llm-ft chat`` (``system``, ``max_new_tokens``, ``backend``, ...).
    """
    from common import chat as chat_cmd
    from common.evaluate import metrics as M
    from common.generation import load_generator

    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    options.setdefault("max_new_tokens", 256)
    options["target"] = str(target)
    cfg = build_config(chat_cmd.ChatConfig, options, config=config, env_file=env_file)
    validator = None
    if json_schema is not None:
        from common.data import load_schema

        path = Path(json_schema)
        if not path.is_file():
            raise UserError(f"{path}: JSON schema not found")
        validator = load_schema(path)
    from common.structured.schema import violations

    gen = load_generator(cfg.target, backend=cfg.backend, system_prompt=cfg.system, chat_template=cfg.chat_template,
                         tokenizer=cfg.tokenizer, n_ctx=cfg.n_ctx)
    try:
        answers = gen.generate_batch([[{"role": "user", "content": t}] for t in items],
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, seed=cfg.seed)
    finally:
        gen.close()
    results = []
    for text, answer in zip(items, answers, strict=True):
        ok, value = M.parse_json(answer)[:2]
        problems = [] if ok else ["answer is not valid JSON"]
        if ok and validator is not None:
            problems += [message for _, message in violations(value, validator.schema, validator)]
        intent = value.get("intent") if ok and isinstance(value, dict) else None
        results.append(ClassifyResult(text=text, answer=answer, data=value if ok else None,
                                      intent=intent if isinstance(intent, str) else None, problems=problems))
    return results[0] if single else results


def push(run: str | Path, repo: str, *, api=None, token: str | None = None, **options: Any) -> PushResult:
    """Publish a run to the Hugging Face Hub (``llm-ft push``); ``dry_run=True`` only stages the folder."""
    from common.push import cmd

    options.update(run=str(run), repo=repo)
    cfg = build_config(cmd.PushConfig, options)
    return cmd.push(cfg, api=api, token=token)
