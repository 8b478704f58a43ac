"""Shared helpers of the preference tests (no tests here): pairs and the formulas, written independently.

The reference here computes each answer's log-prob from the full logits of that sequence
alone (no batching, no padding, no chunking) and applies the published formulas in float64.
"""

from __future__ import annotations

import numpy as np

from common.preference_data import PairExample
from common.rows import Example


def pairs(seed: int = 0, n: int = 3) -> list[PairExample]:
    """Random pairs over the tiny vocabulary: a shared prompt, answers of different lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = [int(x) for x in rng.integers(3, 399, int(rng.integers(3, 6)))]
        sides = []
        for _side in range(2):
            answer = [int(x) for x in rng.integers(3, 399, int(rng.integers(2, 7)))]
            sides.append(Example(prompt + answer, [0] * len(prompt) + [1] * len(answer)))
        out.append(PairExample(sides[0], sides[1]))
    return out


def reference(method: str, pc, pr, nc, nr, rc, rr, ops, *, beta=0.1, dpo_loss="sigmoid", lam=0.1):
    """Per-pair (losses, chosen rewards, rejected rewards) from the papers' formulas.

    ``pc, pr``: policy log-prob sums of the chosen/rejected answers; ``nc, nr`` their token
    counts; ``rc, rr`` the reference's sums. ``ops`` gives ``logsigmoid``, ``log1p``, ``exp`` of
    the array library (torch or mlx), so the test can differentiate the reference too.
    DPO (Rafailov et al. 2023): -log sigmoid(beta ((pc - rc) - (pr - rr))).
    IPO (Azar et al. 2023, as TRL computes it): (h - 1/(2 beta))^2 with length-averaged log-probs.
    ORPO (Hong et al. 2024): -mean logp(c) - lam log sigmoid(log odds(c) - log odds(r)),
    odds(y) = P / (1 - P) with log P = mean token log-prob.
    """
    if method == "orpo":
        mc, mr = pc / nc, pr / nr
        log_odds = (mc - mr) - (ops.log1p(-ops.exp(mc)) - ops.log1p(-ops.exp(mr)))
        return -mc - lam * ops.logsigmoid(log_odds), lam * mc, lam * mr
    if dpo_loss == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    h = (pc - rc) - (pr - rr)
    loss = -ops.logsigmoid(beta * h) if dpo_loss == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    return loss, beta * (pc - rc), beta * (pr - rr)


CASES = [("dpo", "sigmoid"), ("dpo", "ipo"), ("orpo", None)]
