"""``llm-ft train``: fine-tune a base model with LoRA on chat/text data into a run directory.

Parse -> validate -> run. :func:`run` loads the data and the model, writes the run
directory's description (config.json, system_prompt.txt, data_fingerprint.json), hands
the loop (common.train.loop) a backend, then writes summary.json and loss.png. The layout
is documented in common/run_dir.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import config
from common.backends import DevicePlan
from common.command import main_for, make_parser
from common.errors import UserError
from common.io import write_json, write_text
from common.options import TrainConfig, memory_mode
from common.run_dir import lock_for_training

SAMPLE_TOKENS_MAX = 256  # longest sample answer generated at an evaluation


def build_parser():
    parser = make_parser("train", "Fine-tune a model with LoRA/QLoRA into a run directory "
                         "(config.json, adapter/, checkpoints/, metrics.jsonl, loss.png, summary.json).", TrainConfig)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit (use it as a -c file)")
    return parser


def default_run_dir(model: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "run"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _has_run(path: Path) -> bool:
    return any((path / n).exists() for n in ("config.json", "adapter", "checkpoints", "metrics.jsonl"))


@dataclass
class Prepared:
    """The run's inputs, loaded and checked before any model weights are read."""

    run_dir: Path
    resolved: Any  # common.models.ResolvedModel
    tokenizer: Any
    system_prompt: str | None
    fingerprint: dict[str, Any]
    data: Any  # common.train.loop.TrainData


def _samples(rows, formatter, tokenizer, n: int):
    from common.prompts import generation_prompt_messages
    from common.rows import Conversation
    from common.train.loop import Sample

    out = []
    for row in rows:
        if len(out) >= n:
            break
        if not isinstance(row, Conversation):
            continue
        messages, expected = generation_prompt_messages(row)
        answer_len = len(tokenizer.encode(expected, add_special_tokens=False)) if expected else 48
        prompt_text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        out.append(Sample(formatter.prompt_ids(messages, tools=row.tools), expected,
                          min(SAMPLE_TOKENS_MAX, answer_len + 16), prompt_text))
    return out


def _as_conversations(rows):
    """Preference pairs as their chosen conversations (the answers the samples should give)."""
    from common.preference_data import Preference
    from common.rows import Conversation

    return [Conversation(r.conversation(r.chosen), r.source, r.tools) if isinstance(r, Preference) else r
            for r in rows]


def prepare(cfg: TrainConfig, console) -> Prepared:
    """Resolve the run directory, the model and tokenizer, and load + tokenize the data."""
    from common.data import fingerprint, load_splits
    from common.locate import load_for_data
    from common.models import load_tokenizer, resolve_model
    from common.prompts import ChatFormatter, encode_split
    from common.train.loop import TrainData

    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.model)
    if cfg.resume and not (run_dir / "checkpoints").is_dir():
        raise UserError(f"--resume: {run_dir} has no checkpoints/ to continue from")
    if not cfg.resume and run_dir.exists() and _has_run(run_dir):
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it, or choose another --out")
    system_prompt, prompt_path = load_for_data(cfg.system_prompt_file, cfg.data)
    console.print(f"system prompt: {prompt_path or 'none'}", highlight=False, soft_wrap=True)
    resolved = resolve_model(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(resolved.path)
    splits = load_splits(cfg.data, valid_fraction=cfg.valid_fraction, seed=cfg.seed, schema=cfg.json_schema,
                         tokenizer=tokenizer, max_seq_length=cfg.max_seq_length, data_config=cfg.data_config)
    splits.report.raise_if_errors()
    formatter = ChatFormatter(tokenizer, template=cfg.chat_template, system_prompt=system_prompt,
                              train_on_prompt=cfg.train_on_prompt)
    if cfg.method != "sft":  # preference pairs (DPO, ORPO)
        from common.preference_data import encode_pairs

        train, train_stats = encode_pairs(splits.train, formatter, cfg.max_seq_length, cfg.overlong)
        valid, valid_stats = encode_pairs(splits.valid, formatter, cfg.max_seq_length, cfg.overlong)
    else:
        train, train_stats = encode_split(splits.train, formatter, cfg.max_seq_length, cfg.overlong, progress=True)
        valid, valid_stats = encode_split(splits.valid, formatter, cfg.max_seq_length, cfg.overlong, progress=True)
    if not train:
        raise UserError("no training example has a token to learn from "
                        f"({train_stats['zero_supervised']} lost their answer to --max-seq-length {cfg.max_seq_length})")
    for name, stats in (("train", train_stats), ("valid", valid_stats)):
        if stats["truncated"] or stats["dropped"] or stats["zero_supervised"]:
            console.print(f"[yellow]{name}: {stats['truncated']} truncated, {stats['dropped']} dropped, "
                          f"{stats['zero_supervised']} without answer tokens (max_seq_length {cfg.max_seq_length})[/]")
    fp = fingerprint(splits)
    fp["encoded"] = {"train": train_stats, "valid": valid_stats}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (formatter.eos_id or 0)
    data = TrainData(train=train, valid=valid, pad_id=pad_id,
                     samples=_samples(_as_conversations(splits.valid), formatter, tokenizer, cfg.sample_prompts),
                     decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop_ids=formatter.eot_ids)
    console.print(f"data: {len(train)} train / {len(valid)} valid examples, "
                  f"{train_stats['tokens_total']:,} train tokens (p95 {train_stats['tokens_p95']})")
    return Prepared(run_dir, resolved, tokenizer, system_prompt, fp, data)


def _preflight(cfg: TrainConfig, resolved, longest: int, plan: DevicePlan, console, world=None) -> TrainConfig:
    """Refuse, before loading any weight, a run that would not fit in memory (common.models.memory);
    with --max-memory, first pick the fastest memory mode that fits it; under a launcher, one process's
    need against its share (common.models.ranks). Returns ``cfg`` in the memory mode chosen."""
    import json

    from common.models import memory
    from common.models.ranks import RankLayout

    ranks = RankLayout(world.size, cfg.fsdp, world.local_size) if world is not None and world.size > 1 else None

    model_config = json.loads((Path(resolved.path) / "config.json").read_text(encoding="utf-8"))
    seq_len = cfg.max_seq_length if cfg.packing else longest
    rows = cfg.batch_size
    if cfg.method != "sft":  # both answers of each pair; DPO's reference pass runs without gradients, one
        rows *= 1 if cfg.packing else 2  # layer's activations at a time, which the margin of the estimate covers
        seq_len = 2 * longest if cfg.packing else longest
    rows = plan.rows_per_pass(rows, seq_len)  # trained in row groups: activations of one group
    kw = dict(plan=plan, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r, targets=cfg.targets, batch_size=rows,
              seq_len=seq_len, num_layers=cfg.num_layers, ranks=ranks, lean=memory.lean_allowed(cfg))
    if cfg.max_memory is not None:
        return _budget_mode(cfg, model_config, kw, console)
    # offload is estimated as checkpoint: an upper bound (the layer inputs it moves to the host are small)
    est = memory.preflight(model_config, **kw, grad_checkpoint=memory_mode(cfg) != "default")
    console.print(f"[dim]memory estimate{' ' + ranks.describe() if ranks else ''}: {est.describe()}[/]")
    return cfg


def _budget_mode(cfg: TrainConfig, model_config: dict, kw: dict, console) -> TrainConfig:
    """--max-memory: the fastest memory mode that fits (common.models.memory.choose_mode), said on one line."""
    from common.models import memory

    requested = cfg.memory_mode if cfg.memory_mode != "auto" else ("checkpoint" if cfg.grad_checkpoint else "auto")
    mode, line = memory.choose_mode(model_config, budget=memory.parse_size(cfg.max_memory), requested=requested, **kw)
    if cfg.memory_mode == "offload" and mode != "offload":  # kept where it saves nothing (a CPU run)
        line = line.replace(f"memory mode {mode}:", f"memory mode offload (estimated as {mode}: nothing to offload "
                            f"to on {kw['plan'].device}):", 1)
        mode = "offload"
    console.print(line, highlight=False)
    return dataclasses.replace(cfg, memory_mode=mode, grad_checkpoint=mode != "default")


def write_description(p: Prepared, cfg: TrainConfig, backend: str) -> None:
    """config.json, system_prompt.txt and data_fingerprint.json: the run describes itself."""
    cfg_dict = config.to_dict(cfg)
    cfg_dict["backend"] = backend
    r = p.resolved
    cfg_dict["base_model"] = {"spec": r.spec, "path": str(r.path), "source": r.source,
                              "gguf_file": str(r.gguf_file) if r.gguf_file else None}
    write_json(p.run_dir / "config.json", cfg_dict)
    if p.system_prompt is not None:
        write_text(p.run_dir / "system_prompt.txt", p.system_prompt)  # exactly, no newline added
    write_json(p.run_dir / "data_fingerprint.json", p.fingerprint)


def with_default_lr(cfg: TrainConfig, model_dir: Path, console) -> TrainConfig:
    """Fill in the learning rate when none was given: larger for small models.

    Measured on the shipped intent data with SmolLM2-135M (2 epochs, batch 4): lr 2e-4 gives
    ~85-89% intent accuracy, 5e-4 gives 93% (see the demo issue's note).
    """
    if cfg.lr is not None:
        return cfg
    from common.models.catalog import parameter_count
    from common.options import DEFAULT_LR, DPO_LR, SMALL_MODEL_LR, SMALL_MODEL_PARAMS

    if cfg.method == "dpo":
        console.print(f"lr {DPO_LR:g} (default for --method dpo; set --lr to choose)")
        return dataclasses.replace(cfg, lr=DPO_LR)
    n_params, _ = parameter_count(model_dir)
    small = 0 < n_params < SMALL_MODEL_PARAMS
    lr = SMALL_MODEL_LR if small else DEFAULT_LR
    console.print(f"lr {lr:g} (default for a model of {n_params / 1e6:,.0f}M parameters"
                  f"{': under 1B' if small else ''}; set --lr to choose)")
    return dataclasses.replace(cfg, lr=lr)


def run(cfg: TrainConfig, *, console=None) -> int:
    """Train; returns 0, or 130 after a Ctrl-C that left a checkpoint to resume from."""
    with contextlib.ExitStack() as held:  # the run directory's lock, from when its path is known to the end
        return _run(cfg, console, held)


def _run(cfg: TrainConfig, console, held: contextlib.ExitStack) -> int:
    from rich.console import Console

    from common import backends
    from common.train import checkpoint as ckpts
    from common.train.identity import run_info
    from common.train.loop import INTERRUPTED, Trainer, planned_steps
    from common.train.metrics import MetricsLog, check_reporters, truncate_after
    from common.train.plot import plot_loss
    from common.train.world import from_env

    world = from_env()
    # Under a launcher every rank runs this; only rank 0 prints (errors still reach stderr) and writes.
    console = console or Console(stderr=True, quiet=not world.is_main)
    backend_name = backends.resolve(cfg.backend)
    check_reporters(cfg.report_to)
    if cfg.init_adapter:
        init_adapter_dir(cfg.init_adapter)  # a wrong path fails before any data or weight is read
    if cfg.fsdp:
        _check_fsdp(backend_name, cfg.nproc, world)
    if cfg.nproc > 1 and not world.launcher:
        from common.train.launch import relaunch

        return relaunch(backend_name, cfg.nproc)
    backend = None
    if world.distributed:
        backend = backends.load_backend(backend_name)
        world = _join_world(backend, world, cfg, held)
    p = prepare(cfg, console)
    if world.is_main:
        held.callback(lock_for_training(p.run_dir, resume=cfg.resume).release)
    cfg = with_default_lr(cfg, p.resolved.path, console)
    if world.distributed:  # also a barrier: no rank sees rank 0's files before all have checked the directory
        _check_same_config(backend, world, cfg, p.fingerprint)
    info_for_resume = run_info(cfg, backend=backend_name, model_dir=p.resolved.path, tokenizer=p.tokenizer,
                               data_fingerprint=p.fingerprint, train_examples=p.data.train)
    # The data order and each step's examples depend on the global batch, not on how it is split:
    # a checkpoint of 2 ranks x grad_accum 2 resumes on 1 rank x grad_accum 4.
    info_for_resume["global_batch"] = cfg.batch_size * info_for_resume.pop("grad_accum") * world.size
    resume_from = None
    if cfg.resume:
        resume_from = ckpts.newest_verified(p.run_dir, warn=lambda m: console.print(f"[yellow]warning: {m}[/]"))
        if resume_from is None:
            raise UserError(f"--resume: no checkpoint in {p.run_dir / 'checkpoints'} verifies; "
                            "run without --resume (and another --out) to start over")
        _check_resumable(resume_from, info_for_resume, cfg.allow_global_batch_change)
        finished = ckpts.finished(p.run_dir, resume_from, planned_steps(cfg, p.data, world.size))
        if finished:  # nothing to train: leave every file as it is
            console.print(finished)
            return 0
    plan = backends.device_plan(backend_name, cfg.device, cfg.dtype)
    longest = max(max(len(e.chosen), len(e.rejected)) if hasattr(e, "chosen") else len(e) for e in p.data.train)
    cfg = _preflight(cfg, p.resolved, longest, plan, console, world)

    backend = backend or backends.load_backend(backend_name)
    info = backend.setup(p.resolved.path, cfg, p.data.pad_id)
    console.print(f"backend {backend_name}: {info.device}, {info.dtype}; LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} "
                  f"on {', '.join(info.target_modules)}: {info.trainable_params:,} trainable of "
                  f"{info.total_params:,} parameters")
    for note in info.notes:
        console.print(f"  {note}", highlight=False)

    _start_preference(cfg, backend, p, console, write=world.is_main)
    metrics_file = p.run_dir / "metrics.jsonl"
    if world.is_main:
        p.run_dir.mkdir(parents=True, exist_ok=True)
        ckpts.remove_stale(p.run_dir)
        write_description(p, cfg, backend_name)
        if resume_from is not None:
            truncate_after(metrics_file, ckpts.read(resume_from)[0]["step"])
            console.print(f"resuming from {resume_from}")
        log = MetricsLog(metrics_file, cfg.report_to, cfg.run_name or p.run_dir.name, config.to_dict(cfg),
                         p.run_dir / "tensorboard", project=cfg.wandb_project)
    else:
        log = _NoLog()
    trainer = Trainer(cfg, backend, p.data, p.run_dir, base_model=str(p.resolved.path), run_info=info_for_resume,
                      log=log, progress_console=console, world=world)
    ranks = f" on each of {world.size} ranks ({world.launcher})" if world.distributed else ""
    console.print(f"training {trainer.total_steps} steps of {cfg.batch_size} x {cfg.grad_accum} "
                  f"{'packed rows' if cfg.packing else 'examples'}{ranks} into {p.run_dir}")
    try:
        summary = trainer.fit(resume_from)
    finally:
        log.close()
        if world.is_main:
            plot_loss(metrics_file, p.run_dir / "loss.png", title=f"{cfg.run_name or p.run_dir.name}: "
                      f"{p.resolved.spec} ({backend_name})")
    if not world.is_main:
        return INTERRUPTED if summary["stop_reason"] == "interrupted" else 0
    summary.update({"backend": backend_name, "device": info.device, "dtype": info.dtype,
                    "trainable_params": info.trainable_params, "total_params": info.total_params,
                    "target_modules": info.target_modules, "base_model": str(p.resolved.path)})
    write_json(p.run_dir / "summary.json", summary)
    _report(console, p.run_dir, summary)
    return INTERRUPTED if summary["stop_reason"] == "interrupted" else 0


def init_adapter_dir(spec: str) -> Path:
    """``--init-adapter``: a run directory (its adapter/) or an adapter directory."""
    path = Path(spec)
    for d in (path / "adapter", path):
        if (d / "adapter_config.json").is_file():
            return d
    raise UserError(f"--init-adapter {spec}: no adapter_config.json in {path / 'adapter'} or {path}")


def _start_preference(cfg: TrainConfig, backend, p: Prepared, console, write: bool = True) -> None:
    """Start from ``--init-adapter`` and attach precomputed reference log-probs (before any step)."""
    if cfg.init_adapter:
        backend.load_adapter(init_adapter_dir(cfg.init_adapter))
        console.print(f"starting from the adapter of {cfg.init_adapter}")
    if cfg.method == "dpo" and (cfg.precompute_ref or cfg.ref == "init-adapter"):
        from common.train import reference

        console.print(reference.attach(backend, p.data, p.run_dir, cfg, write=write))  # rank 0 writes the cache


class _NoLog:
    """The metrics log of ranks other than 0: rank 0 writes every row once."""

    def log(self, event: str, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _join_world(backend, world, cfg: TrainConfig, held: contextlib.ExitStack):
    if not hasattr(backend, "all_sum"):
        raise UserError(f"the {backend.name} backend does not train data-parallel ({world.launcher} started "
                        f"{world.size or 'several'} processes); run one process")
    world = backend.init_world(world, cfg)
    held.callback(backend.close_world)
    return world


def _check_fsdp(backend_name: str, nproc: int, world) -> None:
    if backend_name != "torch":
        raise UserError(f"--fsdp: sharding the base (FSDP2) is a torch option; the {backend_name} backend keeps "
                        "the whole base on every process", ["drop --fsdp, or use --backend torch"])
    if nproc <= 1 and not world.launcher:
        raise UserError("--fsdp shards the base model over the processes of a data-parallel job, and this is one "
                        "process", ["add --nproc N (N processes on this machine), or start it with torchrun"])


def _check_same_config(backend, world, cfg: TrainConfig, fingerprint: dict[str, Any]) -> None:
    """Every rank must train the same thing: compare a digest of the resolved config and the data."""
    from common.train.world import config_digest

    digest = config_digest({"config": config.to_dict(cfg), "data": fingerprint})
    mine = [0.0] * (4 * world.size)
    mine[4 * world.rank: 4 * world.rank + 4] = digest
    every = backend.all_sum(mine)  # a gather: each rank fills its own slots
    groups: dict[tuple, list[int]] = {}
    for r in range(world.size):
        groups.setdefault(tuple(every[4 * r: 4 * r + 4]), []).append(r)
    if len(groups) > 1:
        differ = [r for g in groups.values() if 0 not in g for r in g]
        raise UserError(f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} resolved a different configuration or data than "
                        "rank 0: every rank must run the same command on the same files")


def _check_resumable(ckpt: Path, current: dict[str, Any], allow_batch_change: bool) -> None:
    from common.train import checkpoint as ckpts

    saved = dict(ckpts.read(ckpt)[1])
    if "grad_accum" in saved:  # a checkpoint from before data parallelism: one process
        saved["global_batch"] = saved.get("batch_size", 0) * saved.pop("grad_accum")
    found = ckpts.mismatches(saved, current)
    batch = [m for m in found if m.startswith("global_batch:")]
    if batch and allow_batch_change:
        found = [m for m in found if m not in batch]
    elif batch:
        found = [m + " (batch size x grad accum x processes: adjust --grad-accum to the number of processes, "
                 "or pass --allow-global-batch-change)" if m in batch else m for m in found]
    if found:
        raise UserError(f"cannot resume from {ckpt}: the run differs from the checkpoint's "
                        "(start a new --out, or restore the original settings)", found)


def _report(console, run_dir: Path, s: dict[str, Any]) -> None:
    from common.train.progress import human_bytes

    best = f"{s['best_eval_loss']:.4f} at step {s['best_step']}" if s["best_eval_loss"] is not None else "n/a"
    tps = f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "?"
    console.print(f"done ({s['stop_reason']}): {s['steps']} steps, {s['tokens']:,} tokens at {tps} tokens/s, "
                  f"peak memory {human_bytes(s['peak_memory_bytes'])}; best eval loss {best}")
    print(f"adapter: {run_dir / 'adapter'}")  # the result on stdout, the log above on stderr
    if s["stop_reason"] != "interrupted":  # an interrupted run's next step (--resume) was printed by the loop
        console.print(f"next: llm-ft eval {run_dir}   then: llm-ft export {run_dir}", highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    def print_config(args, cfg) -> int | None:
        if args.print_config:
            print(config.to_yaml(cfg), end="")
            return 0
        return None

    return main_for(build_parser, TrainConfig, run, argv, extra=print_config)


if __name__ == "__main__":
    raise SystemExit(main())
