"""DPO and ORPO on the MLX backend: per-sequence log-probs and the pair losses.

An answer's log-prob is the sum of its target tokens' log-probs, gathered at the target
positions only (as :mod:`mlx_ft.loss` does for SFT). The reference of DPO is the same
model with every LoRA/DoRA layer swapped for the base linear it wraps, for the duration
of one forward pass without gradients: no second copy of the weights, and exact for DoRA
too (a zero LoRA scale would leave DoRA's trained magnitude in place). The preference
step runs eagerly (not ``mx.compile``d): its shapes change with every pair batch anyway.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from common.train.methods import PairBatch, PreferenceSpec, sequence_index
from mlx_ft import lora
from mlx_ft import loss as mlxloss
from mlx_ft import model as mlxm


@contextmanager
def adapter_off(model: nn.Module):
    """The base model: each LoRA/DoRA layer replaced by its base linear, then put back."""
    layers = lora.lora_layers(model)
    model.update_modules(tree_unflatten([(p, m.linear) for p, m in layers.items()]))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(list(layers.items())))


def _views(backend, batch):
    """Loss views of the batch plus each target's sequence index."""
    v = backend._views(batch)
    mask = np.asarray(batch.loss_mask)
    seg = np.asarray(batch.segment_ids)
    hit = (mask[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)  # as mlx_ft.loss.views picks them
    r, t = np.nonzero(hit)
    index = np.asarray(sequence_index(batch.segment_ids), dtype=np.int32)
    seq = np.zeros(v.picks.shape[0], np.int32)  # filler rows (weight 0) count for sequence 0: nothing
    seq[:len(r)] = index[r, t + 1]
    n_seq = int(sum(max(row, default=0) for row in batch.segment_ids))
    return v, mx.array(seq), n_seq


def sequence_sums(model, head, v, seq: mx.array, n_seq: int) -> mx.array:
    """(n_seq,) fp32 log-prob sums of the batch's sequences."""
    cache = None
    if v.segments is not None:
        cache = [mlxm.SegmentMask.for_model(model, v.segments)] * len(model.layers)
    if head is None:
        logits = model(v.inputs, cache=cache)
        rows = logits.reshape(-1, logits.shape[-1])[v.picks]
    else:
        hidden = model.model(v.inputs, cache=cache)
        rows = head(hidden.reshape(-1, hidden.shape[-1])[v.picks])
    token = -mlxloss.token_losses(rows, v.targets) * v.weights
    onehot = (seq[:, None] == mx.arange(n_seq)[None, :]).astype(mx.float32)  # (N, n_seq)
    return token @ onehot


def pair_losses(spec: PreferenceSpec, pc, pr, nc, nr, rc=None, rr=None) -> tuple[mx.array, dict]:
    """Per-pair losses and metrics from policy (p) and reference (r) log-prob sums and token counts (n)."""
    if spec.length_average:
        pc, pr = pc / nc, pr / nr
        if rc is not None:
            rc, rr = rc / nc, rr / nr
    sg = mx.stop_gradient
    if spec.method == "orpo":
        log_odds = (pc - pr) - (mx.log1p(-mx.exp(pc)) - mx.log1p(-mx.exp(pr)))
        ratio = nn.log_sigmoid(log_odds)
        losses = -pc - spec.orpo_lambda * ratio
        chosen, rejected = spec.orpo_lambda * sg(pc), spec.orpo_lambda * sg(pr)
        extra = {"nll_loss": -sg(pc), "log_odds_ratio": sg(ratio)}
    else:
        chosen_ratio, rejected_ratio = pc - rc, pr - rr
        h = chosen_ratio - rejected_ratio
        losses = -nn.log_sigmoid(spec.beta * h) if spec.dpo_loss == "sigmoid" else (h - 1 / (2 * spec.beta)) ** 2
        chosen, rejected = spec.beta * sg(chosen_ratio), spec.beta * sg(rejected_ratio)
        extra = {}
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/accuracies": (chosen > rejected).astype(mx.float32), "logps/chosen": sg(pc),
               "logps/rejected": sg(pr), **extra}
    return losses, metrics


def _counts(batch) -> mx.array:
    mask = np.asarray(batch.loss_mask)
    seg = np.asarray(batch.segment_ids)
    hit = (mask[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    index = np.asarray(sequence_index(batch.segment_ids))[:, 1:][hit]
    n_seq = int(sum(max(row, default=0) for row in batch.segment_ids))
    return mx.array(np.bincount(index, minlength=n_seq).astype(np.float32))


def sequence_logps(backend, batch, adapter: bool = True) -> list[tuple[float, int]]:
    """(sum, count) per sequence without gradients, in eval mode; ``adapter=False``: the base model."""
    model = backend.model
    training = model.training
    model.train(False)
    try:
        v, seq, n_seq = _views(backend, batch)
        if adapter:
            sums = sequence_sums(model, backend.head, v, seq, n_seq)
        else:
            with adapter_off(model):
                sums = sequence_sums(model, backend.head, v, seq, n_seq)
        counts = _counts(batch)
        mx.eval(sums, counts)
    finally:
        model.train(training)
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), counts.tolist(), strict=True)]


def _reference(backend, batch: PairBatch, v, seq, n_seq) -> mx.array:
    """(n_pairs, 2) reference sums: precomputed ones, or the base model's now."""
    if batch.ref is not None:
        return mx.array(np.asarray(batch.ref, dtype=np.float32))
    with adapter_off(backend.model):
        ref = mx.stop_gradient(sequence_sums(backend.model, backend.head, v, seq, n_seq))
    mx.eval(ref)  # before the adapter comes back
    return ref.reshape(-1, 2)


def _loss_fn(backend, spec: PreferenceSpec):
    def fn(model, v, seq, n_seq, counts, ref, scale):
        sums = sequence_sums(model, backend.head, v, seq, n_seq)
        rc, rr = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
        losses, metrics = pair_losses(spec, sums[0::2], sums[1::2], counts[0::2], counts[1::2], rc, rr)
        total = losses.sum()
        return total * scale, total, {k: m.sum() for k, m in metrics.items()}
    return fn


def forward_backward(backend, batch: PairBatch, scale: float, spec: PreferenceSpec) -> tuple[float, dict]:
    """Gradients of ``scale * sum(pair losses)`` added to the step's; (loss sum, metric sums)."""
    from mlx_ft.backend import _mix

    backend._mode(True)
    if backend._grads is not None:
        mx.eval(backend._grads)  # one micro-batch's activations at a time
    v, seq, n_seq = _views(backend, batch)
    ref = _reference(backend, batch, v, seq, n_seq) if spec.needs_reference else None
    mx.random.seed(_mix(backend.seed, backend.draws))  # dropout masks depend on (seed, micro-batch) only
    backend.draws += 1
    grad_fn = nn.value_and_grad(backend.model, _loss_fn(backend, spec))
    (_, total, sums), grads = grad_fn(backend.model, v, seq, n_seq, _counts(batch), ref,
                                      mx.array(scale, dtype=mx.float32))
    mx.eval(total, sums)
    value = float(total)
    if not math.isfinite(value):
        backend._nonfinite = True
        return value, {k: float(s) for k, s in sums.items()}
    backend._grads = grads if backend._grads is None else tree_map(mx.add, backend._grads, grads)
    return value, {k: float(s) for k, s in sums.items()}


def evaluate(backend, batch: PairBatch, spec: PreferenceSpec) -> tuple[float, dict]:
    backend._mode(False)
    try:
        v, seq, n_seq = _views(backend, batch)
        ref = _reference(backend, batch, v, seq, n_seq) if spec.needs_reference else None
        _, total, sums = _loss_fn(backend, spec)(backend.model, v, seq, n_seq, _counts(batch), ref, mx.array(1.0))
        mx.eval(total, sums)
    finally:
        backend._mode(True)
    return float(total), {k: float(s) for k, s in sums.items()}
