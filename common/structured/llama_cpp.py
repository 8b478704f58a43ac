"""Exact log-probs of continuations in llama.cpp (for a classifier's confidence on a GGUF).

The context is evaluated once; each continuation is then evaluated from the end of the
context (the KV cache past it is dropped, as llama-cpp-python does when ``n_tokens`` is
rewound), in a second llama.cpp context that keeps logits for every position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def scoring_context(gen, need: int):
    """The generator's all-positions-logits context, (re)made large enough for ``need`` tokens."""
    from llama_cpp import Llama

    llm = getattr(gen, "_loss_llm", None)
    if llm is None or llm.n_ctx() < need:
        if llm is not None:
            llm.close()
        ctx = max(256, math.ceil(need / 256) * 256)
        # logits_all keeps one row of logits per position: ctx * n_vocab * 4 bytes.
        llm = Llama(model_path=str(gen.target.gguf_file), n_ctx=ctx, logits_all=True, verbose=False)
        gen._loss_llm = llm  # shared with the engine's loss(), which makes the same kind of context
    return llm


def score_continuations(gen, context: list[int], continuations: Sequence[list[int]],
                        end_ids: Sequence[int] | None = None) -> list[float]:
    """Sum of log-probs (nats) of each continuation's tokens after ``context``, plus, with ``end_ids``, the
    log of the probability that one of those tokens comes next."""
    import numpy as np

    def logp(row) -> np.ndarray:
        row = np.asarray(row, dtype=np.float64)
        top = row.max()
        return row - (top + np.log(np.exp(row - top).sum()))

    llm = scoring_context(gen, len(context) + max(len(c) for c in continuations))
    llm.reset()
    llm.eval(context)
    first = logp(llm.scores[len(context) - 1])  # predicts each continuation's first token
    out = []
    for c in continuations:
        llm.n_tokens = len(context)  # eval() drops the cache past n_tokens before it appends
        llm.eval(c)
        rows = [first] + [logp(llm.scores[len(context) + j]) for j in range(len(c))]
        total = sum(rows[j][t] for j, t in enumerate(c))
        if end_ids:
            ends = rows[len(c)][list(end_ids)]
            total += ends.max() + np.log(np.exp(ends - ends.max()).sum())
        out.append(float(total))
    return out
