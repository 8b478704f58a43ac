"""``llm-ft models``: list, import and inspect base models.

    llm-ft models list                       imported GGUFs and Hugging Face cache entries
    llm-ft models import FILE.gguf [--name]  import a GGUF once (into $LLM_FT_HOME/models)
    llm-ft models info [MODEL] [--batch B --seq S --lora-r R --load-in-4bit --grad-checkpoint --backend ...]
                                             architecture, size, tokenizer, export support, memory estimate

Each action has its own config dataclass; ``run(cfg)`` dispatches on its type.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from common.adapters import IMPORT_ADAPTER_HELP, ModelsImportAdapterConfig, run_import_adapter
from common.backends import BackendName
from common.command import Parser, add_arguments, add_config_arguments, from_args
from common.config import opt, register
from common.models.rm import RM_HELP, ModelsRmConfig, run_rm
from common.options import DEFAULT_TARGETS
from common.prompts import TEMPLATE_NAMES


@register
@dataclass
class ModelsListConfig:
    hub: bool = opt(True, "also list models in the Hugging Face cache (HF_HUB_CACHE / HF_HOME)")


@register
@dataclass
class ModelsImportConfig:
    file: str = opt(help="the .gguf file to import", positional=True)
    name: str | None = opt(None, "directory name for the import (default: the file's name without .gguf)")


@register
@dataclass
class ModelsInfoConfig:
    model: str = opt("default", "a Hugging Face Hub id, a local HF directory, a .gguf file, or 'default'",
                     positional=True)
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of MODEL")
    trust_remote_code: bool = opt(False, "allow models that need their own Python code", cli_only=True)
    backend: BackendName = opt("auto", "backend to estimate memory for")
    device: str | None = opt(None, "torch device for the estimate (cuda, cuda:1, mps, cpu); default: the best available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "compute dtype for the estimate")
    batch_size: int = opt(4, "examples per micro-batch", short="--batch", min=1)
    max_seq_length: int = opt(1024, "tokens per example", short="--seq", min=1)
    lora_r: int = opt(16, "LoRA rank", min=1)
    targets: list[str] = opt(factory=lambda: list(DEFAULT_TARGETS), help="module names to adapt")
    num_layers: int | None = opt(None, "adapt only the last N layers (default: all)", min=1)
    load_in_4bit: bool = opt(False, "estimate with a 4-bit base")
    grad_checkpoint: bool = opt(False, "estimate with gradient checkpointing")
    max_memory: str | None = opt(None, "a training memory budget (16GB, 16GiB, 12000MB): show each memory mode's "
                                 "estimate and the one train --max-memory would pick")
    nproc: int = opt(1, "estimate for one of N data-parallel processes (train --nproc N): the whole base each, or "
                     "1/N of it with --fsdp; processes on the CPU or a Mac share its memory", min=1)
    fsdp: bool = opt(False, "with --nproc: the base sharded over the processes (train --fsdp, torch)")


def run_list(cfg: ModelsListConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from common.models.catalog import list_models
    from common.models.memory import format_bytes

    rows = list_models(include_hub=cfg.hub)
    console = Console()
    if not rows:
        console.print("no imported or cached models yet (llm-ft models import FILE.gguf, or train with --model)")
        return 0
    if not console.is_terminal:  # piped: one tab-separated line per model, never truncated
        print("name\tsource\tarchitecture\tsize\tpath")
        for r in rows:
            print("\t".join([r["name"], r["source"], r["architecture"], format_bytes(r["size"]), r["path"]]))
        return 0
    table = Table("name", "source", "architecture", "size", "path")
    for r in rows:
        table.add_row(r["name"], r["source"], r["architecture"], format_bytes(r["size"]), r["path"])
    console.print(table)
    return 0


def run_import(cfg: ModelsImportConfig) -> int:
    from pathlib import Path

    from common.errors import UserError
    from common.models.gguf_import import import_gguf

    if Path(cfg.file).suffix.lower() != ".gguf":
        raise UserError(f"{cfg.file}: expected a .gguf file")
    print(import_gguf(cfg.file, name=cfg.name, rename=True))
    return 0


def model_info(cfg: ModelsInfoConfig) -> dict[str, Any]:
    """Everything ``models info`` shows, as plain data."""
    from common import backends
    from common.models import memory, resolve_model
    from common.models.catalog import exporter_support, parameter_count, tokenizer_facts
    from common.models.safety import read_json

    resolved = resolve_model(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    model_config = read_json(resolved.path / "config.json")
    n_params, dtypes = parameter_count(resolved.path)
    if model_config.get("quantization") or model_config.get("quantization_config"):
        n_params = memory.Shape.from_config(model_config).parameter_count()  # packed weights: count from shapes
    backend = backends.resolve(cfg.backend)
    plan = backends.device_plan(backend, cfg.device, cfg.dtype)  # what train would run on
    ranks = _rank_layout(cfg, backend)
    assessment = memory.assess(model_config, plan=plan, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r,
                               targets=cfg.targets, batch_size=cfg.batch_size, seq_len=cfg.max_seq_length,
                               grad_checkpoint=cfg.grad_checkpoint, num_layers=cfg.num_layers,
                               ranks=ranks, lean=memory.lean_allowed(cfg))
    modes = memory_modes(model_config, cfg, plan, ranks) if cfg.max_memory else None
    exportable, export_note = exporter_support(model_config)
    archs = model_config.get("architectures") or [model_config.get("model_type")]
    return {"model": resolved.to_dict(), "architecture": archs[0], "model_type": model_config.get("model_type"),
            "parameters": n_params, "dtype": model_config.get("torch_dtype") or model_config.get("dtype"),
            "weight_dtypes": dtypes, "vocab_size": model_config.get("vocab_size"),
            "layers": model_config.get("num_hidden_layers"), "hidden_size": model_config.get("hidden_size"),
            "tokenizer": tokenizer_facts(resolved.path), "exportable": exportable, "export": export_note,
            "backend": backend, "device": plan.device, "memory": assessment, "memory_modes": modes}


def memory_modes(model_config: dict[str, Any], cfg: ModelsInfoConfig, plan, ranks=None) -> dict[str, Any]:
    """--max-memory: each memory mode's estimate and the pick (or the error train would stop with)."""
    from common.errors import UserError
    from common.models import memory

    try:
        budget = memory.parse_size(cfg.max_memory)
    except ValueError as exc:
        raise UserError(f"--max-memory {cfg.max_memory}: {str(exc).split(': ', 1)[1]}") from None
    kw = dict(plan=plan, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r, targets=cfg.targets,
              batch_size=cfg.batch_size, seq_len=cfg.max_seq_length, num_layers=cfg.num_layers, ranks=ranks,
              lean=memory.lean_allowed(cfg))
    table = [(m, e.describe()) for m, e in memory.mode_table(model_config, **kw)]
    try:
        pick, line = memory.choose_mode(model_config, budget=budget, **kw)
    except UserError as exc:
        pick, line = None, exc.message + "; " + "; ".join(p for p in exc.problems if p.startswith("would fit"))
    return {"budget": budget, "table": table, "pick": pick, "line": line}


def _rank_layout(cfg: ModelsInfoConfig, backend: str):
    """``--nproc``/``--fsdp`` as the preflight's per-process layout (None: one process)."""
    from common.errors import UserError
    from common.models.ranks import RankLayout

    if cfg.fsdp and backend != "torch":
        raise UserError(f"--fsdp: sharding the base (FSDP2) is a torch option; the {backend} backend keeps the "
                        "whole base on every process", ["drop --fsdp, or use --backend torch"])
    if cfg.fsdp and cfg.nproc == 1:
        raise UserError("--fsdp shards the base over processes: give their number with --nproc N")
    return RankLayout(cfg.nproc, cfg.fsdp) if cfg.nproc > 1 else None


def run_info(cfg: ModelsInfoConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from common.models.memory import format_bytes

    info = model_info(cfg)
    tok, mem = info["tokenizer"], info["memory"]
    table = Table(show_header=False, box=None)
    rows = [
        ("model", f"{info['model']['path']} ({info['model']['source']})"),
        ("architecture", f"{info['architecture']} (model_type {info['model_type']})"),
        ("parameters", f"{info['parameters'] / 1e6:.1f} M, {info['layers']} layers, hidden {info['hidden_size']}"),
        ("dtype", f"{info['dtype']} (weights: {', '.join(info['weight_dtypes'])})"),
        ("vocabulary", f"{info['vocab_size']} (tokenizer: {tok['type']}, {tok['size']} tokens)"),
        ("chat template", "yes" if tok["chat_template"] else f"no (pass --chat-template {TEMPLATE_NAMES})"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in tok["special"].items()) +
         f"; add_bos_token={tok['add_bos_token']}; end of turn: {', '.join(tok['end_of_turn']) or 'none'}"),
        ("GGUF export", info["export"]),
        (f"memory ({info['backend']}, {info['device'] or 'default device'})",
         f"batch {cfg.batch_size} x seq {cfg.max_seq_length}, LoRA r={cfg.lora_r}"
         f"{', ' + layout.describe() if (layout := _rank_layout(cfg, info['backend'])) else ''}: "
         f"{mem.estimate.describe()}"),
        ("available", f"{mem.where}: " + ("fits" if mem.fits else f"does NOT fit (limit {format_bytes(mem.limit)})")),
    ]
    rows += [("would fit", s) for s in mem.suggestions]
    if info.get("memory_modes"):
        rows += [(f"mode {m}", d) for m, d in info["memory_modes"]["table"]]
        rows.append(("--max-memory", info["memory_modes"]["line"]))
    for k, v in rows:
        table.add_row(f"[bold]{k}[/]", v)
    Console().print(table)
    return 0


# action -> (config class, run function, one-line help). The MLX work adds "import-adapter"
# here: (ModelsImportAdapterConfig, run_import_adapter, "import an MLX adapter ...").
ACTIONS: dict[str, tuple[type, Callable[[Any], int], str]] = {
    "list": (ModelsListConfig, run_list, "list imported GGUFs and models in the Hugging Face cache"),
    "import": (ModelsImportConfig, run_import, "import a .gguf file as a Hugging Face directory (done once per file)"),
    "info": (ModelsInfoConfig, run_info, "architecture, size, tokenizer, chat template, GGUF export support "
                                         "and a training memory estimate"),
    "import-adapter": (ModelsImportAdapterConfig, run_import_adapter, IMPORT_ADAPTER_HELP),
    "rm": (ModelsRmConfig, run_rm, RM_HELP),
}


def run(cfg) -> int:
    """Run the action whose config ``cfg`` is."""
    for cls, fn, _ in ACTIONS.values():
        if type(cfg) is cls:
            return fn(cfg)
    raise TypeError(f"not a models config: {type(cfg).__name__}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llm-ft models", description="List, import and inspect base models.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    for name, (cls, _, summary) in ACTIONS.items():
        sp = sub.add_parser(name, help=summary, description=summary)
        add_arguments(sp, cls)
        add_config_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from common.cli import run_command

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.action:
        parser.print_help()
        return 2
    cls = ACTIONS[args.action][0]
    return run_command(lambda: run(from_args(cls, args)), getattr(args, "debug", False))
