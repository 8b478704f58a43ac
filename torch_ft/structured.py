"""Structured output on the torch engine: the schema's token hook as a transformers logits processor,
and exact log-probs of continuations (for a classifier's confidence)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ConstraintProcessor:
    """A transformers ``LogitsProcessor``: rows of a batch follow their own grammar state.

    ``generate`` calls it once per new token with every row's ids so far; the first call sees
    only the (left-padded) prompts, each later one the token each row produced last.
    """

    def __init__(self, batch):
        self.batch = batch  # common.structured.constraint.BatchConstraint
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
            self.batch.advance([None] * input_ids.shape[0])
        else:
            self.batch.advance(input_ids[:, -1].tolist())
        allowed = torch.from_numpy(self.batch.masks(scores.shape[-1])).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


def processors(constraint, rows: int):
    """The ``logits_processor`` argument of ``generate`` for ``rows`` answers (None when unconstrained)."""
    if constraint is None:
        return None
    from transformers import LogitsProcessorList

    return LogitsProcessorList([ConstraintProcessor(constraint.batch(rows))])


def score_continuations(model, device, context: list[int], continuations: Sequence[list[int]], pad_id: int,
                        end_ids: Sequence[int] | None = None) -> list[float]:
    """Sum of log-probs (nats) of each continuation's tokens after ``context``, plus, with ``end_ids``, the
    log of the probability that one of those tokens comes next.

    The context runs once; its KV cache, repeated per continuation, serves one right-padded batch of the
    continuations (a classifier's values: 14 short continuations after a ~300-token prompt cost one prompt
    pass, not 14). Pads follow the scored tokens, so under the causal mask they change nothing scored.
    """
    n = len(continuations)
    width = max(len(c) for c in continuations)
    with torch.no_grad():
        head = model(input_ids=torch.tensor([context], device=device), use_cache=True)
        cache = head.past_key_values
        cache.batch_repeat_interleave(n)
        rows = torch.tensor([c + [pad_id] * (width - len(c)) for c in continuations], device=device)
        logits = model(input_ids=rows, past_key_values=cache, use_cache=True).logits.float()
        # position j of the batch predicts continuation token j + 1; the context's last position, token 0
        logits = torch.cat([head.logits[:, -1:].float().expand(n, 1, -1), logits], dim=1)
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for r, c in enumerate(continuations):
        total = logp[r, torch.arange(len(c), device=device), torch.tensor(c, device=device)].sum()
        if end_ids:
            total = total + torch.logsumexp(logp[r, len(c), torch.tensor(list(end_ids), device=device)], dim=0)
        out.append(float(total))
    return out
