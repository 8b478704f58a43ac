"""The base model on MLX: loading with mlx-lm, dtype, 4/8-bit quantisation, the
attention mask of packed batches, gradient checkpointing, and Batch -> arrays
(the loss's views of a batch are in :mod:`mlx_ft.loss`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from common.archs import ARCHS
from common.errors import UserError
from common.train.backend import Batch

# mlx-lm modules whose attention masks 5-D grouped scores: the table's, and gear (not exported)
GROUPED_MASK_MODELS = (*(row.mlx_model for row in ARCHS.values() if row.mlx_grouped_mask), "gear")
QUANT_GROUP = 64  # MLX's default group size: 64 input features share one scale and bias


def device_name() -> str:
    dev = mx.default_device()
    if dev.type == mx.gpu:
        return "gpu (metal)" if mx.metal.is_available() else "gpu (cuda)"
    return "cpu"


def select_device(name: str | None) -> None:
    """Honour --device: cpu, or gpu (also spelt cuda/mps/metal); None keeps MLX's default (the GPU when present)."""
    if name is None:
        return
    kind = name.split(":")[0].lower()
    if kind == "cpu":
        mx.set_default_device(mx.cpu)
    elif kind in ("gpu", "cuda", "mps", "metal"):
        if not mx.is_available(mx.gpu):
            raise UserError(f"--device {name}: this MLX build has no GPU (install mlx with Metal or mlx[cuda], "
                            "or use --device cpu)")
        mx.set_default_device(mx.gpu)
    else:
        raise UserError(f"--device {name}: MLX knows cpu and gpu")


def resolve_dtype(name: str) -> mx.Dtype:
    """auto = fp32 on the CPU, bf16 on a GPU (Metal and CUDA both support it)."""
    if name == "auto":
        return mx.float32 if mx.default_device().type == mx.cpu else mx.bfloat16
    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]


def _config_overrides(model_dir: Path) -> dict:
    """Config fields mlx-lm reads under their older names.

    transformers 5 writes RoPE settings as ``rope_parameters: {rope_theta, rope_type, ...}``;
    mlx-lm's llama/qwen/... read ``rope_theta`` and ``rope_scaling``, and would silently
    fall back to theta 10000 (wrong logits for SmolLM2's 100000).
    """
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rope = cfg.get("rope_parameters")
    out: dict[str, Any] = {}
    if isinstance(rope, dict) and "full_attention" not in rope:
        if "rope_theta" not in cfg and "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def load_base(model_dir: Path, trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """The mlx-lm model for a Hugging Face directory (pre-quantised MLX checkpoints included)."""
    from mlx_lm.utils import load_model

    model_dir = Path(model_dir)
    try:
        model, config = load_model(model_dir, model_config=_config_overrides(model_dir),
                                   trust_remote_code=trust_remote_code)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise UserError(f"{model_dir}: mlx-lm cannot load this model ({exc})") from None
    return model, config


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def quantize(model: nn.Module, bits: int) -> int:
    """MLX's own affine quantisation of every linear/embedding whose width fits the group; returns how many."""
    count = 0

    def predicate(_path: str, m: nn.Module) -> bool:
        nonlocal count
        ok = hasattr(m, "to_quantized") and m.weight.shape[-1] % QUANT_GROUP == 0
        count += ok
        return ok

    nn.quantize(model, group_size=QUANT_GROUP, bits=bits, class_predicate=predicate)
    return count


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast the base's floating parameters (quantised weights stay packed integers)."""
    model.set_dtype(dtype)


def uses_rope(model: nn.Module) -> bool:
    """RoPE attention depends on relative positions only (see :class:`SegmentMask`)."""
    return any(isinstance(m, nn.RoPE) or "rope" in type(m).__name__.lower() for _, m in model.named_modules())


class SegmentMask:
    """Stands in for each layer's KV cache during training so mlx-lm models attend per segment.

    mlx-lm models build their mask with ``cache.make_mask`` when a cache is given; this one
    returns causal & same-segment (& sliding window), and passes keys/values through.
    Positions are not fed: with rotary embeddings a query-key score depends only on the
    distance between them, and inside one segment that distance is the same whether
    positions restart at the segment or continue across the row (tested against separate
    rows). Padding (segment 0) attends only to padding, so no softmax row is empty.
    """

    offset = 0

    def __init__(self, segment_ids: mx.array, grouped_heads: bool = False):
        self.segment_ids = segment_ids  # (B, L) int32
        self.grouped_heads = grouped_heads  # scores shaped (B, kv_heads, repeats, L, L): one more axis

    @classmethod
    def for_model(cls, model: nn.Module, segment_ids: mx.array) -> SegmentMask:
        """The mask for ``model``'s attention: mlx-lm's gemma2 (and gear) reshape grouped queries
        to (B, kv_heads, repeats, L, D) before applying the mask, the others do not."""
        attn = getattr(model.layers[0], "self_attn", None)
        grouped = getattr(attn, "repeats", 1) > 1 and type(attn).__module__.rsplit(".", 1)[-1] in GROUPED_MASK_MODELS
        return cls(segment_ids, grouped)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        seg = self.segment_ids
        idx = mx.arange(n)
        mask = (idx[:, None] >= idx[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
        if window_size is not None:
            mask = mask & (idx[:, None] < idx[None, :] + window_size)[None]
        if self.grouped_heads:
            return mask[:, None, None]  # (B, 1, 1, L, L)
        return mask[:, None]  # (B, 1, L, L): broadcast over heads

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass (mx.checkpoint).

    Each block gets a private subclass whose ``__call__`` is checkpointed, so other models
    in the process (and the class mlx-lm shares between them) are untouched.
    """
    for block in model.layers:
        cls = type(block)
        if getattr(cls, "_llmft_checkpointed", False):
            continue
        original = cls.__call__

        def call(self, *args, _original=original, **kwargs):
            def inner(params, *a, **k):
                self.update(params)
                return _original(self, *a, **k)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        block.__class__ = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": call, "_llmft_checkpointed": True})


def expected_positions(segment_ids: list[int]) -> list[int]:
    """Position ids that restart at 0 at each segment start (padding continues its own count)."""
    out, prev, pos = [], None, 0
    for s in segment_ids:
        pos = 0 if s != prev else pos + 1
        out.append(pos)
        prev = s
    return out


def batch_arrays(batch: Batch) -> dict[str, mx.array]:
    """The Batch's lists as (B, L) arrays, exactly: ``input_ids``, ``loss_mask``, ``segment_ids``, ``position_ids``."""
    lengths = {len(r) for key in ("input_ids", "loss_mask", "segment_ids", "position_ids") for r in getattr(batch, key)}
    assert len(lengths) == 1, f"batch rows are not padded to one length: {sorted(lengths)}"
    return {
        "input_ids": mx.array(batch.input_ids, dtype=mx.int32),
        "loss_mask": mx.array(batch.loss_mask, dtype=mx.int32),
        "segment_ids": mx.array(batch.segment_ids, dtype=mx.int32),
        "position_ids": mx.array(batch.position_ids, dtype=mx.int32),
    }


def is_packed(batch: Batch) -> bool:
    """True when some row holds more than one example (then the segment mask is needed)."""
    return any(max(row, default=0) > 1 for row in batch.segment_ids)


def check_positions(batch: Batch) -> None:
    """Packed rows must use per-segment positions: that is what the segment mask reproduces."""
    for r, (segs, pos) in enumerate(zip(batch.segment_ids, batch.position_ids, strict=True)):
        n = sum(1 for s in segs if s > 0)
        if list(pos[:n]) != expected_positions(segs)[:n]:
            raise AssertionError(f"row {r}: position_ids do not restart at each segment")
