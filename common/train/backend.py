"""The plug-in surface of a training backend (MLX, PyTorch) and the batch it receives.

The loop (common.train.loop) owns data order, schedule, accumulation, evaluation,
checkpoints and resume; a backend owns tensors: the model, the LoRA layers, the
optimizer and its state. Everything crossing this boundary is plain Python.
Backends are listed, and loaded, in :mod:`common.backends`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from common.options import TrainConfig


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

    def setup(self, model_dir: Path, cfg: TrainConfig, pad_id: int) -> BackendInfo:
        """Load the base model from a Hugging Face directory and attach LoRA.

        ``cfg`` is a :class:`common.options.TrainConfig`; a backend reads the model and LoRA
        fields (lora_r, lora_alpha, lora_dropout, targets, num_layers, use_dora, use_rslora,
        load_in_4bit/8bit, grad_checkpoint, dtype, device, trust_remote_code), the
        optimizer's (optim, weight_decay) and its own options (torch: attention, kernels, compile). The framework RNG is seeded with ``cfg.seed``
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
