"""The training loss on MLX: token cross-entropy at the supervised positions only.

The decoder's hidden states are gathered at the positions whose next token is a target
before the output head, so prompt and padding positions cost no lm_head matmul and no
(B, T, vocab) logits exist. Logits stay in the model's dtype; logsumexp and the sums
are fp32 (the cast covers the (targets, vocab) logits only).

Shapes can reach ``mx.compile`` rounded up (row width to ``width_multiple``, number of
targets to ``target_multiple`` and to ``target_bits`` significant bits): each new shape is a
new trace, and on a GPU new kernels. The width of length-grouped batches takes a few values;
the number of targets moves with every batch, so it is bucketed geometrically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_ft import model as mlxm

PROBE_IDS = [[1, 2, 3, 5, 8]]  # checks that a model's logits are head(body(ids)) exactly

Head = Callable[[mx.array], mx.array]  # hidden states (N, hidden) -> logits (N, vocab)


@dataclass
class LossViews:
    """A batch as the loss takes it: inputs and the flat positions of its targets."""

    inputs: mx.array  # (B, W) int32 ids, right-padded; W = L - 1 rounded up
    segments: mx.array | None  # (B, W) int32 segment ids, only for packed rows (else None: plain causal mask)
    picks: mx.array  # (N,) int32 positions r * W + t whose next token is a target
    targets: mx.array  # (N,) int32 the token at t + 1
    weights: mx.array  # (N,) float32: 1 for a target, 0 for filler rows (rounding N up; at least one row)
    count: int  # real targets (N before rounding)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def bucket(n: int, multiple: int = 1, bits: int | None = None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` and, with ``bits``, to a number whose binary
    form has at most ``bits`` significant bits (above ``multiple``): at most ``2 ** (1 - bits)``
    filler on top of ``n`` (12.5% for 4 bits), and about ``2 ** (bits - 1)`` sizes per doubling of n.
    """
    size = _round_up(n, multiple)
    if bits is not None and size > 1:
        step = 2 ** max(0, (size - 1).bit_length() - bits)  # n in (2^(k-1), 2^k]: steps of 2^(k-bits)
        size = _round_up(size, max(multiple, step))
    return size


def views(batch, pad_id: int, packed: bool, width_multiple: int = 1, target_multiple: int = 1,
          target_bits: int | None = None) -> LossViews:
    """The loss views of a :class:`~common.train.backend.Batch` (next-token targets, logits at t predict t+1).

    A target counts when ``loss_mask[t+1] == 1`` and t+1 lies in the same (non-padding)
    segment as t, so a packed row never predicts one example from another.
    """
    ids = np.asarray(batch.input_ids, dtype=np.int32)
    mask = np.asarray(batch.loss_mask, dtype=np.int32)
    seg = np.asarray(batch.segment_ids, dtype=np.int32)
    rows, length = ids.shape
    width = _round_up(length - 1, width_multiple)
    hit = (mask[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    r, t = np.nonzero(hit)
    n = len(r)
    size = bucket(n, target_multiple, target_bits)
    picks = np.zeros(size, np.int32)
    targets = np.zeros(size, np.int32)
    weights = np.zeros(size, np.float32)
    picks[:n], targets[:n], weights[:n] = r * width + t, ids[r, t + 1], 1.0
    inputs = np.full((rows, width), pad_id, np.int32)
    inputs[:, :length - 1] = ids[:, :-1]
    segments = None
    if packed:
        segments = np.zeros((rows, width), np.int32)  # the rounding's columns are padding (segment 0)
        segments[:, :length - 1] = seg[:, :-1]
        segments = mx.array(segments)
    return LossViews(mx.array(inputs), segments, mx.array(picks), mx.array(targets), mx.array(weights), n)


def output_head(model: nn.Module) -> Head | None:
    """The output head such that ``model(ids) == head(model.model(ids))``, or None.

    Candidates are the untied ``lm_head`` and the tied embedding; the one whose logits on a
    probe equal the model's exactly is used. None (e.g. Gemma 2's soft-capped logits, or
    a model without ``.model``): the loss gathers rows of the full logits instead.
    """
    body = getattr(model, "model", None)
    if not isinstance(body, nn.Module):
        return None
    candidates: list[Head] = []
    if isinstance(getattr(model, "lm_head", None), nn.Module):
        candidates.append(model.lm_head)
    embed = getattr(body, "embed_tokens", None)
    if hasattr(embed, "as_linear"):
        candidates.append(embed.as_linear)
    training = model.training
    model.eval()  # no dropout in the probe
    try:
        probe = mx.array(PROBE_IDS, dtype=mx.int32)
        reference = model(probe)
        hidden = body(probe)
        for head in candidates:
            logits = head(hidden)
            if logits.shape == reference.shape and bool(mx.array_equal(logits, reference)):
                return head
    finally:
        model.train(training)
    return None


@mx.custom_function
def token_losses(logits: mx.array, targets: mx.array) -> mx.array:
    """Cross-entropy of each row of ``logits`` (N, vocab, any float dtype), in fp32.

    Its gradient is written by hand (below) so that backward keeps nothing of size N x vocab
    in fp32: autograd through ``logsumexp(logits.astype(float32))`` holds the fp32 copy, its
    exponentials and an fp32 gradient next to the logits (about 13 bytes per logit for bf16
    logits, measured), where ``softmax(precise=True)`` accumulates in fp32 and writes the
    logits' dtype.
    """
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return mx.logsumexp(logits.astype(mx.float32), axis=-1) - picked.astype(mx.float32)


@token_losses.vjp
def _token_losses_vjp(primals, cotangent, output):
    logits, targets = primals
    scale = cotangent[:, None]  # (N, 1) fp32
    grad = mx.softmax(logits, axis=-1, precise=True) * scale.astype(logits.dtype)
    # the target's entry (p_t - 1) * scale in fp32, from p_t = exp(-loss): in bf16, a p_t near 1
    # would round to 1 and its gradient to 0
    at_target = ((mx.exp(-output) - 1.0)[:, None] * scale).astype(logits.dtype)
    grad = mx.put_along_axis(grad, targets[:, None], at_target, axis=-1)
    return grad, mx.zeros_like(targets)


def loss_sum(model: nn.Module, head: Head | None, inputs: mx.array, segments: mx.array | None, picks: mx.array,
             targets: mx.array, weights: mx.array) -> mx.array:
    """Sum of the weighted token cross-entropies (fp32 scalar)."""
    cache = None
    if segments is not None:
        cache = [mlxm.SegmentMask.for_model(model, segments)] * len(model.layers)
    if head is None:
        logits = model(inputs, cache=cache)
        rows = logits.reshape(-1, logits.shape[-1])[picks]
    else:
        hidden = model.model(inputs, cache=cache)
        rows = head(hidden.reshape(-1, hidden.shape[-1])[picks])
    return (token_losses(rows, targets) * weights).sum()
