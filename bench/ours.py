"""Our side of a comparison, run through the real loop: ``common.train.loop.Trainer.train_step``.

The loop's own :class:`~common.train.batching.DataStream` decides the batches (length
grouping, packing); :func:`step_plan` replays the same stream so a baseline can be fed
the identical examples per optimizer step, and :func:`run` checks that ours consumed
exactly that plan.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import Side
from common.config import check
from common.options import TrainConfig

# Benchmark defaults on top of TrainConfig's: no evaluation, checkpoints or samples inside
# the timed steps; a constant learning rate (the baselines' warmup formulas differ).
BENCH_OVERRIDES = dict(lr=2e-4, warmup_steps=0, schedule="constant", eval_every=0, save_every=0, sample_prompts=0,
                       grad_accum=1, log_every=10**9)


def train_config(**overrides: Any) -> TrainConfig:
    """A TrainConfig with the benchmark defaults and ``overrides`` applied (validated)."""
    cfg = replace(TrainConfig(), **{**BENCH_OVERRIDES, **overrides})
    problems = check(cfg)  # each field's range from its metadata, then the cross-field rules
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def _stream(examples, cfg: TrainConfig, pad_id: int):
    from common.train.batching import DataStream

    # The same arguments common.train.loop.Trainer gives its stream.
    return DataStream(examples, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=pad_id,
                      group_by_length=cfg.group_by_length, packing=cfg.packing, max_len=cfg.max_seq_length)


def step_plan(examples, cfg: TrainConfig, pad_id: int, steps: int) -> list[list[int]]:
    """Example indices of each of the first ``steps`` optimizer steps of our run (grad_accum 1)."""
    assert cfg.grad_accum == 1, "benchmarks compare single micro-batch steps"
    stream = _stream(examples, cfg, pad_id)
    return [stream.next()[1] for _ in range(steps)]


def run(cfg: TrainConfig, model_dir: Path, data, steps: int, *, label: str, backend_name: str = "torch",
        plan: list[list[int]] | None = None, cuda: bool = False,
        after_setup: Callable[[Any], None] | None = None) -> Side:
    """Set up our backend, then time ``steps`` calls of the loop's ``train_step``.

    Peak memory: CUDA's max_memory_allocated since before setup (so it includes the
    weights, like the baselines'); elsewhere the caller measures the process.
    """
    from common.backends import load_backend
    from common.train.loop import Trainer

    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    backend = load_backend(backend_name)
    t0 = time.perf_counter()
    info = backend.setup(Path(model_dir), cfg, data.pad_id)
    setup_s = time.perf_counter() - t0
    after_setup_bytes = None
    if cuda:
        import torch

        after_setup_bytes = int(torch.cuda.memory_allocated())  # weights + LoRA (Adam state comes at step 1)
    if after_setup is not None:
        after_setup(backend)  # e.g. snapshot the initial LoRA weights for a baseline to start from
    side = Side(label)
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        trainer = Trainer(cfg, backend, data, Path(tmp), base_model=str(model_dir), run_info={}, log=None)
        trainer.total_steps = steps
        for i in range(steps):
            pos = trainer.stream.position
            epoch_plan = trainer.stream.plan(pos.epoch)
            rows = epoch_plan[pos.index] if pos.index < len(epoch_plan) else trainer.stream.plan(pos.epoch + 1)[0]
            lens = [sum(len(data.train[j]) for j in row) for row in rows]
            tokens_before = trainer.state.tokens
            t = time.perf_counter()
            loss, stats, indices, _lr = trainer.train_step()
            dt = time.perf_counter() - t
            side.record(dt, trainer.state.tokens - tokens_before, len(rows) * max(lens), loss)
            if plan is not None and sorted(indices) != sorted(plan[i]):
                raise RuntimeError(f"{label}: step {i + 1} trained examples {indices}, the plan says {plan[i]}")
    side.peak_memory_bytes = None
    if cuda:
        import torch

        side.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
        side.memory_kind = "cuda max allocated"
        # where the memory goes: resident after setup, after the steps (+ Adam state), the peak, and what the
        # caching allocator held beyond it (slack)
        side.extra["memory_parts"] = {"after_setup": after_setup_bytes, "after_steps": int(torch.cuda.memory_allocated()),
                                      "peak_allocated": side.peak_memory_bytes,
                                      "peak_reserved": int(torch.cuda.max_memory_reserved())}
    side.extra.update({"setup_s": round(setup_s, 2), "backend_peak_memory_bytes": backend.peak_memory(),
                       "backend_notes": info.notes, "trainable_params": info.trainable_params,
                       "total_params": info.total_params})
    side.settings = {k: getattr(cfg, k) for k in (
        "backend", "dtype", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "max_grad_norm", "lora_r",
        "lora_alpha", "lora_dropout", "targets", "num_layers", "load_in_4bit", "grad_checkpoint", "packing",
        "group_by_length", "max_seq_length", "optim", "seed")}
    side.settings["backend"] = backend_name
    side.settings["target_modules"] = info.target_modules
    side.extra["_backend"] = backend  # removed before writing; lets a caller free it
    return side


def release(side: Side) -> None:
    """Drop the backend a :func:`run` kept (frees GPU memory before the next side)."""
    backend = side.extra.pop("_backend", None)
    if backend is not None:
        for attr in ("model", "causal_lm", "optimizer", "params"):
            if hasattr(backend, attr):
                setattr(backend, attr, None)
    import gc

    gc.collect()
