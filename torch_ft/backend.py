"""The PyTorch backend: transformers + peft on CUDA, ROCm, MPS or CPU.

Implements :class:`common.train.backend.Backend`; the shared loop owns everything else.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from common.errors import UserError
from common.options import TrainConfig, memory_mode
from common.peft import CONFIG, WEIGHTS
from common.train.backend import BackendInfo, Batch, StepStats
from common.train.world import World
from torch_ft import attention, fsdp, kernels, lean_mlp, lora_forward, norm_recompute, preference
from torch_ft import device as devices
from torch_ft import dist as dists
from torch_ft import plan as plans
from torch_ft import state as states
from torch_ft.loss import model_inputs, supervised_loss, target_positions, to_device
from torch_ft.model import attach_lora, checkpoint_every, load_base
from torch_ft.optim import make_optimizer

# On CUDA a step's flattened row is padded to a multiple of this many tokens (at most 255 more of
# a few thousand): every new length is new matmul shapes and allocator sizes, and host time per
# kernel launch is what bounds a LoRA step of a small model.
FLAT_MULTIPLE = 256


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        self.model = None  # the peft model
        self.prec: devices.Precision | None = None
        self._nonfinite = False  # a non-finite loss was seen since the last optimizer step
        self._mode: bool | None = None
        self.world = World()
        self.lockstep = False  # --fsdp: every rank must make the same forward calls (each one all-gathers)

    # -- data parallelism (torchrun) ---------------------------------------------------

    def init_world(self, world: World, cfg: TrainConfig) -> World:
        """Join the job's process group before setup (which then loads onto this rank's GPU)."""
        self.world = world
        if cfg.fsdp:
            fsdp.check(cfg, world)
        if world.distributed:
            dists.init(world, devices.choose(cfg.device, cfg.dtype).kind)
        return world

    def all_sum(self, values: list[float]) -> list[float]:
        return dists.all_sum(values) if self.world.distributed else list(values)

    def close_world(self) -> None:
        if self.world.distributed:
            dists.close()

    # -- setup -----------------------------------------------------------------

    def setup(self, model_dir: Path, cfg: TrainConfig, pad_id: int) -> BackendInfo:
        self.prec = devices.choose(cfg.device, cfg.dtype)  # 'cuda' = this rank's GPU (dists.init set it)
        self.pad_id = pad_id
        base = load_base(Path(model_dir), cfg, self.prec)
        kernel_note = kernels.apply(base, self.prec, cfg.kernels)
        self.model, targets = attach_lora(base, cfg, cfg.seed)
        # Hand-written backward passes (sibling LoRA projections as one node, values recomputed in backward
        # rather than stored) read the frozen weights themselves: not under FSDP, which gathers and frees
        # them, nor torch.compile, which fuses the layers its own way
        by_hand = not cfg.fsdp and (cfg.compile == "off" or self.prec.kind != "cuda")
        lora_forward.install(self.model, autocast=self.prec.autocast, group=by_hand)
        lean_note = None
        if by_hand:
            lean = lean_mlp.install(self.model, liger=bool(kernel_note and kernel_note.startswith("Liger")))
            norms = memory_mode(cfg) == "default" and norm_recompute.install(self.model.get_base_model())
            done = ["the MLP's activation product"] * bool(lean) + ["the normalised layer inputs"] * bool(norms)
            lean_note = f"recomputed in backward, not stored: {' and '.join(done)}" if done else None
        shard_note = None
        if cfg.fsdp:
            fsdp.check(cfg, self.world)
            for p in self.model.parameters():
                if p.requires_grad:  # FSDP leaves the LoRA weights (ignored_params) where they are
                    p.data = p.data.to(self.prec.device)
            shard_note = fsdp.shard(self.model, self.world, self.prec.kind)
            self.lockstep = True
        recompute = None
        if self.prec.kind == "cpu" and memory_mode(cfg) == "default":
            done, total = checkpoint_every(self.model.get_base_model(), plans.CPU_RECOMPUTE_EVERY)
            recompute = f"CPU: {done} of {total} layers recomputed in backward (less memory, ~20% more time)"
        elif memory_mode(cfg) == "offload":
            recompute = ("memory mode offload: every layer recomputed in backward, its input kept in pinned CPU "
                         "memory" + (" (on the CPU: kept in place)" if self.prec.kind == "cpu" else ""))
        compile_note = kernels.compile_layers(self.model, self.prec, cfg.compile) if not cfg.fsdp else (
            "torch.compile: off under --fsdp (not supported with sharded layers yet)"
            if cfg.compile == "auto" and self.prec.kind == "cuda" else None)
        self.causal_lm = self.model.get_base_model()
        self._loss = (fsdp.as_root_forward(self.causal_lm, supervised_loss) if cfg.fsdp else
                      lambda inputs, mask, picks=None: supervised_loss(self.causal_lm, inputs, mask, picks))
        self.attn_impl = getattr(self.causal_lm.config, "_attn_implementation", "sdpa") or "sdpa"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, notes = make_optimizer(cfg.optim, self.model, lr=cfg.peak_lr, weight_decay=cfg.weight_decay,
                                               prec=self.prec)
        self.scaler = torch.amp.GradScaler(self.prec.device.type) if self.prec.grad_scaler else None
        self.optimizer.zero_grad(set_to_none=True)
        devices.reset_peak_memory(self.prec)
        trainable = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.model.parameters())
        notes = [f"torch {torch.__version__}: {self.prec.description}, attention {self.attn_impl}"] + notes
        notes += [n for n in (shard_note, kernel_note, lean_note, compile_note, recompute) if n]
        if self.prec.kind == "cpu" and (busy := devices.busy_cpu_note(torch.get_num_threads())):
            notes.append(busy)
        if cfg.load_in_4bit:
            notes.append("QLoRA: nf4 base with double quantisation, "
                         f"{self.prec.dtype_name} compute")
        return BackendInfo(device=str(self.prec.device), dtype=self.prec.dtype_name, trainable_params=trainable,
                           total_params=total, target_modules=targets, notes=notes)

    def _train_mode(self, on: bool) -> None:
        if self._mode is not on:
            self.model.train(on)
            self._mode = on

    def _inputs(self, batch: Batch) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Model inputs, the loss mask and the flat target positions (``torch_ft.loss.target_positions``)."""
        if self.attn_impl == attention.ATTN_NAME:
            # varlen attention keeps the examples apart: rows run end to end as one
            batch = batch.flat(FLAT_MULTIPLE if self.prec.kind == "cuda" else 1, self.pad_id)
        mask_dtype = self.prec.dtype if self.prec.autocast else next(self.causal_lm.parameters()).dtype
        if not mask_dtype.is_floating_point:
            mask_dtype = torch.float32
        inputs = model_inputs(batch, self.prec.device, mask_dtype, self.attn_impl)
        loss_mask = to_device(batch.loss_mask, self.prec.device)
        return inputs, loss_mask, to_device(target_positions(batch.loss_mask), self.prec.device)

    # -- training ----------------------------------------------------------------

    def forward_backward(self, batch: Batch, scale: float) -> float:
        self._train_mode(True)
        total = 0.0
        for part in self._passes(batch):
            inputs, loss_mask, picks = self._inputs(part)
            with devices.autocast(self.prec):
                loss_sum, _ = self._loss(inputs, loss_mask, picks)
            loss = loss_sum * scale
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            # Read after backward: reading it before would drain the GPU's queue between forward and backward.
            value = float(loss_sum.detach())
            total += value
            if not math.isfinite(value):
                self._nonfinite = True  # its gradients are NaN too: the step will be skipped
                if not self.lockstep:  # under FSDP the other ranks wait for this rank's next forward
                    return total
        return total

    def _passes(self, batch: Batch) -> list[Batch]:
        """The batch in row groups (``torch_ft.plan.rows_per_pass``: on the CPU only)."""
        rows = len(batch.input_ids)
        if self.lockstep:  # one pass per micro-batch on every rank: the same number of all-gathers
            return [batch]
        per = plans.rows_per_pass(rows, len(batch.input_ids[0]) if rows else 0, self.prec.kind)
        if per >= rows:
            return [batch]
        return [batch.rows(i, i + per) for i in range(0, rows, per)]

    def optimizer_step(self, lr: float, max_grad_norm: float, skip: bool = False) -> StepStats:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Under data parallelism the loop decides from the summed loss, identical on every rank.
        loss_finite = not self._nonfinite or self.world.distributed
        self._nonfinite = False
        if skip or not loss_finite:
            self.optimizer.zero_grad(set_to_none=True)
            return StepStats(grad_norm=float("nan"), finite=loss_finite, skipped=True)
        if self.world.distributed:  # before clipping and the finiteness check: one rank's NaN stops all
            dists.all_reduce_grads(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        limit = max_grad_norm if max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        grads_finite = math.isfinite(norm)
        if self.scaler is not None:
            # fp16: an overflow is routine; the scaler skips the step and lowers its scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite, skipped = True, not grads_finite
        else:
            if grads_finite:
                self.optimizer.step()
            finite, skipped = grads_finite, not grads_finite
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=norm, finite=finite, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        self._train_mode(False)
        inputs, loss_mask, picks = self._inputs(batch)
        with devices.autocast(self.prec):
            loss_sum, n = self._loss(inputs, loss_mask, picks)
        return float(loss_sum), n

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        from transformers import GenerationConfig

        self._train_mode(False)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.prec.device)
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               eos_token_id=list(stop_ids) or None, pad_token_id=self.pad_id)
        with devices.autocast(self.prec):
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        new = out[0, len(prompt_ids):].tolist()
        stops = set(stop_ids)
        for k, t in enumerate(new):
            if t in stops:
                return new[:k]
        return new

    # -- adapters and state --------------------------------------------------------

    def save_adapter(self, out_dir: Path, base_model: str) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        weights = get_peft_model_state_dict(self.model)
        bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"refusing to save non-finite adapter weights: {', '.join(bad[:5])}")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(out_dir / WEIGHTS),
                  metadata={"format": "pt"})
        config = copy.deepcopy(self.model.peft_config["default"])
        config.base_model_name_or_path = str(base_model)
        config.target_modules = sorted(config.target_modules)  # a set in peft: one order in every saved file
        config.inference_mode = True
        config.save_pretrained(str(out_dir))  # writes adapter_config.json only

    def load_adapter(self, adapter_dir: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter_dir = Path(adapter_dir)
        wfile, cfile = adapter_dir / WEIGHTS, adapter_dir / CONFIG
        for f in (wfile, cfile):
            if not f.exists():
                raise UserError(f"{f}: adapter file missing")
        saved = json.loads(cfile.read_text(encoding="utf-8"))
        ours = self.model.peft_config["default"]
        problems = []
        if int(saved.get("r", -1)) != ours.r:
            problems.append(f"{cfile}: r is {saved.get('r')}, this run uses {ours.r}")
        if sorted(saved.get("target_modules") or []) != sorted(ours.target_modules):
            problems.append(f"{cfile}: target_modules {sorted(saved.get('target_modules') or [])}, "
                            f"this run uses {sorted(ours.target_modules)}")
        if problems:
            raise UserError(f"{adapter_dir}: adapter does not match this model's LoRA setup", problems)
        weights = load_file(str(wfile), device=str(self.prec.device))
        result = set_peft_model_state_dict(self.model, weights)
        expected = set(k for k in self.model.state_dict() if "lora_" in k)
        missing = sorted(k for k in result.missing_keys if "lora_" in k)
        if result.unexpected_keys or missing or not expected:
            raise UserError(f"{wfile}: adapter tensors do not match the model",
                            [f"missing: {k}" for k in missing[:10]] +
                            [f"unexpected: {k}" for k in list(result.unexpected_keys)[:10]])

    def save_state(self, out_dir: Path) -> list[str]:
        out_dir = Path(out_dir)
        return states.save_optimizer(self.optimizer, self.scaler, out_dir) + states.save_rng(out_dir)

    def load_state(self, in_dir: Path, allow_partial: bool = False) -> None:
        in_dir = Path(in_dir)
        states.load_optimizer(self.optimizer, self.scaler, in_dir, allow_partial)
        states.load_rng(in_dir)

    def peak_memory(self) -> int | None:
        return devices.peak_memory(self.prec) if self.prec is not None else None

    # -- preference methods (DPO, ORPO): common.train.methods.PreferenceBackend ------------

    def sequence_logps(self, batch: Batch, adapter: bool = True) -> list[tuple[float, int]]:
        return preference.sequence_logps(self, batch, adapter)

    def preference_forward_backward(self, batch, scale: float, spec) -> tuple[float, dict[str, float]]:
        return preference.forward_backward(self, batch, scale, spec)

    def preference_eval(self, batch, spec) -> tuple[float, dict[str, float]]:
        return preference.evaluate(self, batch, spec)
