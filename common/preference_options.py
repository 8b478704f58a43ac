"""The options of preference tuning (``--method dpo|orpo``): one option group of TrainConfig.

Kept in a module of its own so the group composes into :class:`common.options.TrainConfig`
with one base class; defaults follow TRL's (beta 0.1, sigmoid loss, ORPO lambda 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import opt


@dataclass
class PreferenceOptions:
    GROUP = "training method"
    method: Literal["sft", "dpo", "orpo"] = opt(
        "sft", "what to learn: sft (answers), dpo (preference pairs against a reference), "
        "orpo (preference pairs, no reference)")
    beta: float = opt(0.1, "DPO: how far the policy may move from the reference (higher: stays closer)", gt=0)
    dpo_loss: Literal["sigmoid", "ipo"] = opt("sigmoid", "DPO loss: sigmoid (the DPO paper's) or ipo "
                                              "(squared, on length-averaged log-probs, as TRL computes it)")
    orpo_lambda: float = opt(0.1, "ORPO: weight of the odds-ratio term added to the chosen answers' NLL", min=0)
    precompute_ref: bool = opt(False, "DPO: compute the reference log-probs of every pair once before training "
                               "(cached in the run directory), so each step runs the policy only")
    init_adapter: str | None = opt(None, "start from the adapter of this run directory (or adapter directory), "
                                   "e.g. an SFT run")
    ref: Literal["base", "init-adapter"] = opt("base", "DPO reference: the base model without adapter, or the "
                                               "--init-adapter (then computed once before training)")

    def preference_problems(self) -> list[str]:
        """Checks between these fields (TrainConfig.validate adds them)."""
        problems = []
        if self.ref == "init-adapter" and not self.init_adapter:
            problems.append("ref: 'init-adapter' needs --init-adapter RUN")
        if self.method != "dpo" and (self.precompute_ref or self.ref != "base"):
            problems.append(f"precompute_ref/ref: only --method dpo uses a reference (got --method {self.method})")
        return problems
