"""The training loop, shared by every backend: plain Python and numpy around a Backend.

Per optimizer step: take ``grad_accum`` micro-batches from the stream, scale each one's
loss by 1/(units of the whole step) so the step's gradient is the mean over its units
however they fall into micro-batches, step at the scheduled learning rate. The training
method (:mod:`common.train.methods`) builds the batches and names the units: supervised
tokens for sft, pairs for dpo and orpo.
Around that: evaluation and sample answers, keep-best, early stopping, checkpoints,
resume, non-finite guard, Ctrl-C.
"""

from __future__ import annotations

import math
import os
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.io import WriteError, atomic_dir
from common.rows import Example
from common.train import checkpoint as ckpts
from common.train import methods
from common.train.backend import Backend
from common.train.batching import DataStream, Position, eval_plan
from common.train.metrics import MetricsLog
from common.train.progress import TrainProgress
from common.train.schedule import lr_at
from common.train.world import World

INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), checkpoint written


@dataclass
class Sample:
    """A validation prompt to answer greedily at each evaluation."""

    prompt_ids: list[int]
    expected: str | None
    max_new_tokens: int = 64
    prompt_text: str = ""


@dataclass
class TrainData:
    train: list[Example]
    valid: list[Example]
    pad_id: int
    samples: list[Sample] = field(default_factory=list)
    decode: Callable[[list[int]], str] = lambda ids: " ".join(map(str, ids))
    stop_ids: list[int] = field(default_factory=list)


@dataclass
class LoopState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    index: int = 0  # next micro-batch of the epoch's plan
    tokens: int = 0  # real tokens trained on
    train_time_s: float = 0.0  # time in optimizer steps (excludes eval and checkpoints)
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval_loss: float | None = None
    last_eval_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0
    python_rng: Any = None
    numpy_rng: Any = None


def _rng_states() -> tuple[Any, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [version, list(internal), gauss], [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_states(py: Any, npy: Any) -> None:
    if py is not None:
        random.setstate((py[0], tuple(py[1]), py[2]))
    if npy is not None:
        np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))


NPROC_ENV = "LLM_FT_NPROC"  # set by `train --nproc N` for its ranks: the resume command they print keeps it


def resume_command(run_dir: Path) -> str:
    """The exact command that continues this run: the user's own ``train`` command plus ``--resume``."""
    args = sys.argv[1:]
    if (nproc := os.environ.get(NPROC_ENV)) and "--nproc" not in args:  # a rank of `llm-ft train --nproc N`
        args = [*args, "--nproc", nproc]
    if args[:1] == ["train"]:
        return "llm-ft " + shlex.join(args + ([] if "--resume" in args else ["--resume"]))
    return f"the same 'llm-ft train' command with --out {shlex.quote(str(run_dir))} --resume"


class Interrupt:
    """First Ctrl-C: finish the step, write a checkpoint, exit 130. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> Interrupt:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (tests may run us in a thread)
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _stream(cfg: Any, data: TrainData, method=None) -> DataStream:
    method = method or methods.for_config(cfg, data.pad_id)
    return DataStream(data.train, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=data.pad_id,
                      group_by_length=cfg.group_by_length, packing=cfg.packing and method.packs_examples,
                      max_len=cfg.max_seq_length, build=method.build)


def _total_steps(cfg: Any, stream: DataStream, world_size: int = 1) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(stream.micro_batches_for(cfg.epochs) / (cfg.grad_accum * world_size)))


def planned_steps(cfg: Any, data: TrainData, world_size: int = 1) -> int:
    """The optimizer steps ``cfg`` asks for on ``data`` (what a Trainer would run) on ``world_size`` ranks."""
    return _total_steps(cfg, _stream(cfg, data), world_size)


class Trainer:
    def __init__(self, cfg: Any, backend: Backend, data: TrainData, run_dir: Path, *, base_model: str,
                 run_info: dict[str, Any], log: MetricsLog, progress_console=None, world: World | None = None):
        self.cfg = cfg
        # Data parallelism: every rank draws the same micro-batches and trains on its share;
        # rank 0 alone writes (the caller gives the others a log that drops everything).
        self.world = world or World()
        self.backend = backend
        self.data = data
        self.run_dir = Path(run_dir)
        self.base_model = base_model
        self.run_info = run_info
        self.log = log
        self.console = progress_console
        self.state = LoopState()
        self.method = methods.for_config(cfg, data.pad_id)  # sft, dpo or orpo: batch builder, units, loss
        # the method's metrics (rewards/..., logps/...) are summed over ranks, as the loss is
        self.reduce = backend.all_sum if self.world.distributed else None
        self.packing = cfg.packing and self.method.packs_examples
        self.stream = _stream(cfg, data, self.method)
        self.total_steps = _total_steps(cfg, self.stream, self.world.size)
        self.last_checkpoint: Path | None = None
        self.verified: set[Path] = set()  # checkpoints this process wrote and verified
        self.stop_reason = "completed"
        self.diverged: tuple[float, list[str], bool] | None = None

    # -- resume ------------------------------------------------------------------

    def restore(self, ckpt: Path) -> None:
        """Continue from a verified checkpoint: adapter, optimizer, RNG, step and data position."""
        trainer_state, _ = ckpts.read(ckpt)
        self.backend.load_adapter(ckpt / "adapter")
        self.backend.load_state(ckpt, allow_partial=self.cfg.allow_partial_resume)
        self.state = LoopState(**trainer_state)
        _set_rng_states(self.state.python_rng, self.state.numpy_rng)
        self.stream.position = Position(self.state.epoch, self.state.index)
        self.last_checkpoint = ckpt
        self.log.log("resume", self.state.step, checkpoint=str(ckpt))

    # -- evaluation ----------------------------------------------------------------

    def evaluate(self) -> tuple[float | None, list[str], bool]:
        """(mean validation loss per target token, sources of the batches whose loss is not finite,
        whether every batch is)."""
        if not self.data.valid:
            return None, [], False
        plan = eval_plan([len(e) for e in self.data.valid], batch_size=self.cfg.batch_size,
                         packing=self.packing, max_len=self.cfg.max_seq_length)
        if self.cfg.eval_batches is not None:
            plan = plan[: self.cfg.eval_batches]
        total, count, bad, n_bad = 0.0, 0, [], 0
        mine = plan[self.world.rank::self.world.size]
        if getattr(self.backend, "lockstep", False) and len(mine) < -(-len(plan) // self.world.size):
            # FSDP: every rank makes the same forward calls; this one repeats a batch and drops its result
            self.method.eval_loss(self.backend, self.method.build([[self.data.valid[i] for i in row] for row in plan[0]]))
        for rows in mine:
            s, n = self.method.eval_loss(self.backend, self.method.build([[self.data.valid[i] for i in row]
                                                                          for row in rows]))
            if not math.isfinite(s):
                n_bad += 1
                bad += [str(self.data.valid[i].source) for row in rows for i in row if self.data.valid[i].source]
            total += s
            count += n
        if self.world.distributed:
            total, count, n_bad = self.backend.all_sum([total, count, n_bad])
        return (total / count if count else None), sorted(set(bad)), n_bad == len(plan)

    def samples(self, progress: TrainProgress) -> None:
        lockstep = getattr(self.backend, "lockstep", False)  # FSDP: every rank generates, rank 0 prints
        if not (self.world.is_main or lockstep):
            return
        for k, sample in enumerate(self.data.samples[: self.cfg.sample_prompts]):
            ids = self.backend.generate(sample.prompt_ids, sample.max_new_tokens, self.data.stop_ids)
            if not self.world.is_main:
                continue
            text = self.data.decode(ids)
            mark = "" if sample.expected is None else (" [green]✓[/]" if text.strip() == sample.expected.strip()
                                                      else " [red]✗[/]")
            progress.print(f"  sample {k + 1}: [dim]{sample.prompt_text[-60:]!r}[/] -> {text!r}{mark}")
            self.log.log("sample", self.state.step, index=k, prompt=sample.prompt_text, output=text,
                         expected=sample.expected, exact=None if sample.expected is None
                         else text.strip() == sample.expected.strip())

    def eval_and_keep_best(self, progress: TrainProgress) -> None:
        s = self.state
        loss, bad, all_bad = self.evaluate()
        s.last_eval_step = s.step
        if loss is None:
            return
        if not math.isfinite(loss):  # no adapter can be chosen by it, and training on is futile
            self.stop_reason = "diverged"
            self.log.log("eval", s.step, eval_loss=str(loss), best=False, best_eval_loss=s.best_eval_loss,
                         nonfinite_examples=bad[:20])
            self.diverged = (loss, bad, all_bad)
            progress.print(f"[red]step {s.step}: eval loss {loss}[/]")
            return
        s.last_eval_loss = loss
        improved = math.isfinite(loss) and (s.best_eval_loss is None or loss < s.best_eval_loss)
        if improved:
            s.best_eval_loss, s.best_step, s.evals_without_improvement = loss, s.step, 0
            self.save_best()
        else:
            s.evals_without_improvement += 1
        self.log.log("eval", s.step, eval_loss=loss, best=improved, best_eval_loss=s.best_eval_loss,
                     **self.method.take_eval_metrics(self.reduce))
        progress.print(f"step {s.step}: eval loss {loss:.4f}" + (" (best)" if improved else
                                                                  f" (best {s.best_eval_loss:.4f} at step {s.best_step})"))
        progress.update(s.step, eval_loss=loss)
        self.samples(progress)

    def save_best(self) -> None:
        if not self.world.is_main:
            return
        try:
            with atomic_dir(self.run_dir / "adapter") as tmp:
                self.backend.save_adapter(tmp, self.base_model)
        except WriteError as exc:
            raise self._write_failed(exc) from None

    def _write_failed(self, exc: WriteError) -> WriteError:
        kept = f"checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint else "no checkpoint yet"
        err = WriteError(f"{exc.message}; {kept}; make room, then continue with: {resume_command(self.run_dir)}")
        err.errno = exc.errno
        return err

    def keep_after_divergence(self) -> UserError:
        """Keep what the run has (best adapter, or the weights of its last finite step; its checkpoints)
        and explain; returned for the caller to raise."""
        s = self.state
        loss, bad, all_bad = self.diverged
        kept = []
        adapter = self.run_dir / "adapter"
        if adapter.is_dir():
            kept.append(f"{adapter}: the best adapter (eval loss {s.best_eval_loss:.4f} at step {s.best_step})"
                        if s.best_step is not None else f"{adapter}: the adapter from before this run")
        else:  # a non-finite step is never applied, so the weights now are those of the last finite one
            self.save_best()
            kept.append(f"{adapter}: the weights at step {s.step} (not evaluated: use with care)")
        if self.last_checkpoint is not None:
            kept.append(f"{self.last_checkpoint}: checkpoint to resume from")
        self.log.log("diverged", s.step, eval_loss=str(loss), kept=kept)
        if bad and not all_bad:
            cause = (f"validation examples give a non-finite loss: {', '.join(bad[:5])}"
                     f"{' ...' if len(bad) > 5 else ''}; fix or drop them")
        else:
            cause = ("every validation batch: the model diverged; lower --lr" +
                     (f" and resume ({resume_command(self.run_dir)} --lr ...)" if self.last_checkpoint else ""))
        return UserError(f"eval loss is {loss} at step {s.step}: training stopped; {cause}", [f"kept {k}" for k in kept])

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self, progress: TrainProgress) -> None:
        if not self.world.is_main:  # optimizer state is the same on every rank: rank 0's copy is the checkpoint
            return
        s = self.state
        s.epoch, s.index = self.stream.position.epoch, self.stream.position.index
        s.python_rng, s.numpy_rng = _rng_states()

        def files(tmp: Path) -> list[str]:
            (tmp / "adapter").mkdir()
            self.backend.save_adapter(tmp / "adapter", self.base_model)
            return self.backend.save_state(tmp)

        try:
            path = ckpts.write(self.run_dir, s.step, files, asdict(s), self.run_info)
        except WriteError as exc:
            raise self._write_failed(exc) from None
        problems = ckpts.verify(path)
        if problems:  # the disk did not keep what we wrote: never rotate the previous one away
            progress.print(f"[red]warning: checkpoint {path} does not verify: {'; '.join(problems)}[/]")
            self.log.log("checkpoint", s.step, path=str(path), verified=False)
            return
        self.last_checkpoint = path
        self.verified.add(path)
        ckpts.rotate(self.run_dir, self.cfg.keep, path, is_good=self._is_good)
        self.log.log("checkpoint", s.step, path=str(path.relative_to(self.run_dir)), verified=True)

    # -- the loop ------------------------------------------------------------------------

    def train_step(self) -> tuple[float | None, Any, list[int], float]:
        """One optimizer step; returns (mean token loss, StepStats, example indices, lr).

        The loss is None for a step without a single target token (nothing to learn: skipped).
        """
        cfg, s, world = self.cfg, self.state, self.world
        micro = [self.stream.next() for _ in range(cfg.grad_accum * world.size)]
        total = sum(self.method.units(b) for b, _ in micro)  # supervised tokens (sft) or pairs (dpo, orpo), global
        lr = lr_at(s.step, peak=cfg.peak_lr, warmup=cfg.warmup_steps, total=self.total_steps, kind=cfg.schedule)
        loss_sum, finite = 0.0, True
        for batch, _ in micro[world.rank::world.size]:
            if total == 0:
                break
            value = self.method.forward_backward(self.backend, batch, 1.0 / total)
            loss_sum += value
            finite = finite and math.isfinite(value)
        if world.distributed and total:  # every rank then skips, or steps, alike
            loss_sum = self.backend.all_sum([loss_sum])[0]
            finite = math.isfinite(loss_sum)
        stats = self.backend.optimizer_step(lr, cfg.max_grad_norm, skip=total == 0 or not finite)
        s.tokens += sum(b.n_tokens for b, _ in micro)
        s.step += 1
        return (loss_sum / total if total else None), stats, [i for _, idx in micro for i in idx], lr

    def handle_nonfinite(self, loss: float, stats, indices: list[int], progress: TrainProgress) -> None:
        s = self.state
        what = "loss" if not math.isfinite(loss) else "gradient"
        sources = sorted({str(self.data.train[i].source) for i in indices if self.data.train[i].source})
        action = self.cfg.nonfinite
        s.nonfinite_steps += 1
        self.log.log("nonfinite", s.step, what=what, loss=loss if math.isfinite(loss) else str(loss),
                     grad_norm=stats.grad_norm if math.isfinite(stats.grad_norm) else str(stats.grad_norm),
                     action=action, examples=sources[:20])
        where = f" (examples: {', '.join(sources[:5])})" if sources else ""
        if action == "abort":
            raise UserError(f"non-finite {what} at step {s.step}{where}; stopped without saving it",
                            ["lower --lr, check the data, or use --nonfinite skip"])
        progress.print(f"[yellow]step {s.step}: non-finite {what}, step skipped{where}[/]")

    def fit(self, resume: Path | None = None) -> dict[str, Any]:
        if resume is not None:
            self.restore(resume)  # replaces self.state: bind it only afterwards
        cfg, s = self.cfg, self.state
        wall0 = time.time()
        with TrainProgress(self.total_steps, s.step, self.console, self.world.size) as progress, Interrupt() as interrupt:
            while s.step < self.total_steps:
                t0 = time.perf_counter()
                loss, stats, indices, lr = self.train_step()
                extra = self.method.take_metrics(self.reduce)  # rewards/... of dpo and orpo, over all ranks
                s.train_time_s += time.perf_counter() - t0
                tps = s.tokens / s.train_time_s if s.train_time_s > 0 else 0.0
                if loss is None:
                    self.log.log("empty", s.step, note="no target tokens in this step; skipped")
                elif not stats.finite or not math.isfinite(loss):
                    self.handle_nonfinite(loss, stats, indices, progress)
                elif s.step % cfg.log_every == 0 or s.step == self.total_steps:
                    per_rank = {"world_size": self.world.size, "tokens_per_s_per_rank": round(tps / self.world.size, 1)
                                } if self.world.distributed else {}
                    self.log.log("train", s.step, loss=loss, lr=lr, grad_norm=stats.grad_norm, tokens=s.tokens,
                                 tokens_per_s=round(tps, 1), skipped=stats.skipped,
                                 epoch=round(self.epoch_progress(), 4), **per_rank, **extra)
                progress.update(s.step, loss=loss if loss is not None and math.isfinite(loss) else None, lr=lr, tokens_per_s=tps,
                                peak_memory=self.backend.peak_memory(), margin=extra.get("rewards/margins"),
                                accuracy=extra.get("rewards/accuracies"))
                if cfg.eval_every and s.step % cfg.eval_every == 0 and s.step < self.total_steps:
                    self.eval_and_keep_best(progress)
                    if self.diverged:
                        break
                    if cfg.early_stop_patience and s.evals_without_improvement >= cfg.early_stop_patience:
                        self.stop_reason = "early_stop"
                        self.log.log("early_stop", s.step, best_step=s.best_step, best_eval_loss=s.best_eval_loss)
                        progress.print(f"early stop: {s.evals_without_improvement} evaluations without improvement")
                        break
                if self.world.distributed:  # a Ctrl-C may reach the ranks at different steps: stop together
                    interrupt.requested = self.backend.all_sum([float(interrupt.requested)])[0] > 0
                if interrupt.requested:
                    self.stop_reason = "interrupted"
                    break
                if cfg.save_every and s.step % cfg.save_every == 0 and s.step < self.total_steps:
                    self.save_checkpoint(progress)
            if self.stop_reason == "interrupted":
                self.save_checkpoint(progress)
                if not (self.run_dir / "adapter").is_dir():  # no evaluation chose one yet: the weights now
                    self.save_best()
                self.log.log("interrupt", s.step, checkpoint=str(self.last_checkpoint))
                progress.print(f"interrupted at step {s.step}: checkpoint {self.last_checkpoint} written; "
                               f"continue with: {resume_command(self.run_dir)}", highlight=False)
            else:
                if s.last_eval_step != s.step and not self.diverged:
                    self.eval_and_keep_best(progress)
                if self.diverged:
                    raise self.keep_after_divergence()
                if not self.data.valid:  # nothing to choose by: the final adapter is the one kept
                    self.save_best()
                    s.best_step = s.step
                self.save_checkpoint(progress)
        return self.summary(time.time() - wall0)

    def _is_good(self, path: Path) -> bool:
        return path in self.verified or not ckpts.verify(path)

    def epoch_progress(self) -> float:
        pos = self.stream.position
        n = len(self.stream.plan(pos.epoch)) or 1
        return pos.epoch + pos.index / n

    def summary(self, wall: float) -> dict[str, Any]:
        s = self.state
        return {"stop_reason": self.stop_reason, "steps": s.step, "total_steps": self.total_steps,
                "epochs": round(self.epoch_progress(), 4), "wall_time_s": round(wall, 2),
                "train_time_s": round(s.train_time_s, 2), "tokens": s.tokens,
                "tokens_per_s": round(s.tokens / s.train_time_s, 1) if s.train_time_s else None,
                "peak_memory_bytes": self.backend.peak_memory(), "best_step": s.best_step,
                "best_eval_loss": s.best_eval_loss, "last_eval_loss": s.last_eval_loss,
                "nonfinite_steps": s.nonfinite_steps,
                "last_checkpoint": str(self.last_checkpoint.relative_to(self.run_dir)) if self.last_checkpoint else None}
