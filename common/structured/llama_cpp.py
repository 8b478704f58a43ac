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


def score_continuations(gen, context: list[int], continuations: Sequence[list[int]]) -> list[float]:
    """Sum of log-probs (nats) of each continuation's tokens after ``context``."""
    import numpy as np

    llm = scoring_context(gen, len(context) + max(len(c) for c in continuations))
    llm.reset()
    llm.eval(context)
    last = np.asarray(llm.scores[len(context) - 1], dtype=np.float64)  # predicts each continuation's first token
    out = []
    for c in continuations:
        llm.n_tokens = len(context)  # eval() drops the cache past n_tokens before it appends
        if len(c) > 1:
            llm.eval(c[:-1])
        rows = np.vstack([last[None, :], np.asarray(llm.scores[len(context): len(context) + len(c) - 1],
                                                     dtype=np.float64)])
        top = rows.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
        out.append(float((rows[np.arange(len(c)), c] - lse).sum()))
    return out
