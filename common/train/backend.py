"""The plug-in surface of a training backend (MLX, PyTorch) and the batch it receives.

The loop (common.train.loop) owns data order, schedule, accumulation, evaluation,
checkpoints and resume; a backend owns tensors: the model, the LoRA layers, the
optimizer and its state. Everything crossing this boundary is plain Python.
"""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# On the CPU the torch backend runs a batch's forward and backward in groups of rows of at
# most this many positions (one row when rows are longer): gradients add up, so the step is
# the same, and activation memory is that of one group. Measured with SmolLM2-135M on data/
# (rows of ~100 tokens, batch 4, 2 cores; bench/RESULTS.md): 256 (two rows a pass) runs at
# 0.91-0.96x the speed of whole batches for ~0.83x the peak RSS; 128 (one row) at 0.71x for 0.65x.
CPU_TOKENS_PER_PASS = 256
# ... and recomputes every CPU_RECOMPUTE_EVERY-th transformer layer in backward instead of keeping its
# activations (gradient checkpointing on 1 layer in 6; on all of them with --grad-checkpoint). Same
# model and data, 2 cores (bench/RESULTS.md): 1.61 GiB peak RSS instead of 1.68 for 0.82x the speed;
# 1 layer in 3 gave 1.55 GiB at 0.75x.
CPU_RECOMPUTE_EVERY = 6


def rows_per_pass(rows: int, width: int, device_kind: str) -> int:
    """How many rows of ``width`` positions the torch backend runs per forward/backward."""
    if device_kind != "cpu" or rows * width <= CPU_TOKENS_PER_PASS:
        return rows
    return max(1, CPU_TOKENS_PER_PASS // max(1, width))


@dataclass
class Batch:
    """One micro-batch, already padded (right) to a common length.

    ``segment_ids[r][t]`` numbers the example a token belongs to within row ``r``
    (1, 2, ... when packing; 1 for every real token otherwise) and is 0 for padding.
    ``position_ids`` restart at 0 for each packed example. A backend must stop
    attention across segments and ignore padding. Loss is taken at token t+1 from
    logits at t where ``loss_mask[r][t+1] == 1`` (the mask marks target tokens).
    """

    input_ids: list[list[int]]
    loss_mask: list[list[int]]
    segment_ids: list[list[int]]
    position_ids: list[list[int]]
    n_tokens: int  # real (non-padding) tokens
    n_supervised: int  # tokens that are loss targets (mask == 1, excluding each row's first token)

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` as a batch of their own, trimmed to the longest of them."""
        seg = self.segment_ids[start:stop]
        width = max((max((t + 1 for t, s in enumerate(r) if s), default=0) for r in seg), default=0)
        mask = [r[:width] for r in self.loss_mask[start:stop]]
        return Batch([r[:width] for r in self.input_ids[start:stop]], mask, [r[:width] for r in seg],
                     [r[:width] for r in self.position_ids[start:stop]],
                     n_tokens=sum(1 for r in seg for s in r if s), n_supervised=sum(map(sum, mask)))

    def flat(self, multiple: int = 1, pad_id: int = 0) -> Batch:
        """All rows end to end as one row without padding, segments renumbered across rows.

        For attention that takes segment bounds (varlen on CUDA): the same examples, positions
        and targets, and no position of the step is spent on padding (which a padded batch of
        length-grouped rows still has: up to a row's length per row). ``multiple`` > 1 pads the
        row on the right to a multiple of it (segment 0, no targets), so that steps repeat a few
        shapes.
        """
        ids: list[int] = []
        mask: list[int] = []
        seg: list[int] = []
        pos: list[int] = []
        offset = 0
        for r, row_seg in enumerate(self.segment_ids):
            n = sum(1 for s in row_seg if s)  # padding is on the right
            ids += self.input_ids[r][:n]
            mask += self.loss_mask[r][:n]  # a segment's first token is never a target
            seg += [offset + s for s in row_seg[:n]]
            pos += self.position_ids[r][:n]
            offset += max(row_seg[:n], default=0)
        fill = -len(ids) % multiple
        ids, mask, seg, pos = ids + [pad_id] * fill, mask + [0] * fill, seg + [0] * fill, pos + list(range(fill))
        return Batch([ids], [mask], [seg], [pos], n_tokens=self.n_tokens, n_supervised=self.n_supervised)


@dataclass
class StepStats:
    """What :meth:`Backend.optimizer_step` did.

    ``finite`` is False when the loss or a gradient was NaN/inf (then no update was made);
    ``skipped`` is True whenever no update was made (non-finite, ``skip=True``, or an fp16
    loss-scaler overflow, which is routine and not reported as non-finite).
    """

    grad_norm: float  # global L2 norm before clipping (nan/inf when non-finite)
    finite: bool
    skipped: bool = False


@dataclass
class BackendInfo:
    """What the backend tells the loop (and the run's summary) after setup."""

    device: str
    dtype: str
    trainable_params: int
    total_params: int
    target_modules: list[str]
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Backend(Protocol):
    name: str

    def setup(self, model_dir: Path, cfg: Any, pad_id: int) -> BackendInfo:
        """Load the base model from a Hugging Face directory and attach LoRA.

        ``cfg`` is a :class:`common.options.TrainConfig`; a backend reads the model and LoRA
        fields (lora_r, lora_alpha, lora_dropout, targets, num_layers, use_dora, use_rslora,
        load_in_4bit/8bit, grad_checkpoint, dtype, device, trust_remote_code) and the
        optimizer's (optim, weight_decay). The framework RNG is seeded with ``cfg.seed``
        before the adapter is initialised, so one seed gives one adapter.
        """

    def forward_backward(self, batch: Batch, scale: float) -> float:
        """Accumulate gradients of ``scale * sum(token losses)``; return the unscaled loss sum.

        The loop passes ``scale = 1 / (supervised tokens of the whole optimizer step)``.
        A non-finite loss is returned as is (the loop then skips the step).
        """

    def optimizer_step(self, lr: float, max_grad_norm: float, skip: bool = False) -> StepStats:
        """Clip (``max_grad_norm`` 0 = off), check finiteness, step at ``lr`` (unless ``skip``
        or non-finite), then zero the gradients in every case."""

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """(sum of token losses, number of target tokens) without gradients."""

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """Greedy continuation of ``prompt_ids``: the new tokens only, ending before the first
        stop id (which is not returned), at most ``max_new_tokens`` long."""

    def save_adapter(self, out_dir: Path, base_model: str) -> None:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` in PEFT's format
        (``base_model_name_or_path`` = ``base_model``) into the existing ``out_dir``; no
        other files, no pickle. Raises ValueError if an adapter weight is not finite."""

    def load_adapter(self, adapter_dir: Path) -> None:
        """Load adapter weights written by :meth:`save_adapter` (either backend's)."""

    def save_state(self, out_dir: Path) -> list[str]:
        """Write optimizer state and the framework's RNG state (safetensors + JSON, no pickle)
        into the existing ``out_dir``; return the file names written."""

    def load_state(self, in_dir: Path, allow_partial: bool = False) -> None:
        """Restore what :meth:`save_state` wrote (after :meth:`load_adapter`). Missing
        optimizer state raises UserError unless ``allow_partial`` (then it starts fresh)."""

    def peak_memory(self) -> int | None:
        """Peak memory in bytes since setup (device memory on GPUs), or None if unknown."""


BACKENDS = {"torch": "torch_ft.backend:TorchBackend", "mlx": "mlx_ft.backend:MLXBackend"}


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def choose_backend(name: str) -> str:
    """Resolve ``auto``: MLX on Apple Silicon when installed, else torch."""
    if name != "auto":
        return name
    if is_apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    return "torch"


def load_backend(name: str) -> Backend:
    """Import a backend lazily; a missing extra is a clear error."""
    from common.errors import UserError

    name = choose_backend(name)
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}: choose auto, torch or mlx")
    module_name, cls_name = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = "mlx" if name == "mlx" else "torch"
        raise UserError(f"the {name} backend is not installed ({exc.name or exc}): pip install 'llm-ft[{extra}]'") from None
    return getattr(module, cls_name)()
