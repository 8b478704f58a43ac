"""Structured output on the MLX engine: the schema's token hook as an mlx-lm logits processor, and exact
log-probs of continuations (for a classifier's confidence)."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np


class ConstraintProcessor:
    """An mlx-lm logits processor ``(tokens, logits) -> logits`` for one answer.

    mlx-lm passes every token so far (prompt included); the first call sees the prompt alone.
    """

    def __init__(self, batch):
        self.batch = batch  # common.structured.constraint.BatchConstraint with one row
        self.seen: int | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = int(tokens.shape[-1])
        if self.seen is None:
            self.batch.advance([None])
        else:
            for t in np.array(tokens[self.seen:]).reshape(-1).tolist():
                self.batch.advance([t])
        self.seen = n
        allowed = mx.array(self.batch.masks(int(logits.shape[-1])))
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))


def processors(constraint) -> list | None:
    """The ``logits_processors`` argument of mlx-lm's generation for one answer (None when unconstrained)."""
    return None if constraint is None else [ConstraintProcessor(constraint.batch(1))]


def score_continuations(model, context: list[int], continuations: Sequence[list[int]],
                        end_ids: Sequence[int] | None = None) -> list[float]:
    """Sum of log-probs (nats) of each continuation's tokens after ``context``, plus, with ``end_ids``, the
    log of the probability that one of those tokens comes next.

    The context runs once; its KV cache, repeated per continuation, serves one right-padded batch of the
    continuations (no mask needed: under the causal mask the pads only follow the tokens that are scored).
    Models whose cache is not mlx-lm's plain KVCache (sliding windows...) take one batch of context +
    continuation rows instead.
    """
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    n = len(continuations)
    width = max(len(c) for c in continuations)
    cache = make_prompt_cache(model)
    if all(type(c) is KVCache for c in cache):
        head = model(mx.array([context]), cache=cache)[:, -1:]
        for c in cache:
            keys, values = c.keys_and_values()
            c.state = (mx.repeat(keys, n, axis=0), mx.repeat(values, n, axis=0), c.offset)
        rows = mx.array([c + [0] * (width - len(c)) for c in continuations])
        logits = mx.concatenate([mx.repeat(head, n, axis=0), model(rows, cache=cache)], axis=1)
    else:
        rows = mx.array([context + c + [0] * (width - len(c)) for c in continuations])
        logits = model(rows)[:, len(context) - 1:]  # only the positions that predict a continuation
    logits = logits.astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)
    out = []
    for r, c in enumerate(continuations):
        total = float(sum(logp[r, j, t] for j, t in enumerate(c)))
        if end_ids:
            ends = logp[r, len(c), list(end_ids)]
            total += float(ends.max() + np.log(np.exp(ends - ends.max()).sum()))
        out.append(total)
    return out
