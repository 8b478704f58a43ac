"""Training methods: what a micro-batch holds and how its loss is normalised.

A method is a batch builder plus a loss that every backend implements, run by the one
loop of :mod:`common.train.loop`. The loop asks the method for a micro-batch's units
(SFT: supervised tokens; DPO/ORPO: pairs) and scales each loss by 1/(units of the
whole optimizer step), so a step's gradient is the mean over its tokens or pairs however
they fall into micro-batches.

- ``sft``: token cross-entropy on the answers (:meth:`Backend.forward_backward`).
- ``dpo``: ``-log sigmoid(beta ((pc - rc) - (pr - rr)))`` (sigmoid) or
  ``((pc - rc) - (pr - rr) - 1/(2 beta))^2`` on length-averaged log-probs (ipo), where p/r are
  the policy's/reference's log-prob sums of the chosen (c) and rejected (r) answers.
  The reference is the same model with its adapter disabled, never a second copy.
- ``orpo``: chosen NLL per token ``+ lambda * -log sigmoid(log odds(c) - log odds(r))``, the
  odds from mean token log-probs; no reference.

A pair batch holds both answers of each pair: as adjacent rows (chosen, rejected) or, with
``--packing``, as the two segments of one row; sequence ``2i`` is pair i's chosen answer and
``2i + 1`` its rejected one (rows in order, segments in order within a row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.train.backend import Batch
from common.train.batching import make_batch

# The metrics a preference step logs (TRL's names); each backend returns their sums over pairs.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
ORPO_METRICS = ("nll_loss", "log_odds_ratio")
Reduce = Callable[[list[float]], list[float]]  # a sum over ranks (the backend's all_sum)


@dataclass
class PreferenceSpec:
    """The loss of a preference method (plain numbers: both backends read it)."""

    method: str  # dpo | orpo
    beta: float = 0.1
    dpo_loss: str = "sigmoid"  # sigmoid | ipo
    orpo_lambda: float = 0.1

    @property
    def needs_reference(self) -> bool:
        return self.method == "dpo"

    @property
    def length_average(self) -> bool:
        """Log-probs averaged over each answer's tokens (IPO as TRL computes it, and ORPO) instead of summed."""
        return self.method == "orpo" or self.dpo_loss == "ipo"


@dataclass
class PairBatch(Batch):
    """A :class:`Batch` of preference pairs; ``ref`` holds precomputed reference (chosen, rejected) log-prob sums."""

    n_pairs: int = 0
    ref: list[tuple[float, float]] | None = None
    rows_per_pair: int = 2  # 2: chosen and rejected in adjacent rows; 1: the two segments of one row

    def pairs(self, start: int, stop: int) -> PairBatch:
        """Pairs ``start:stop`` as a batch of their own (rows trimmed to the longest)."""
        k = self.rows_per_pair
        sub = self.rows(start * k, stop * k)
        ref = self.ref[start:stop] if self.ref is not None else None
        return PairBatch(**vars(sub), n_pairs=stop - start, ref=ref, rows_per_pair=k)


def make_pair_batch(pairs: Sequence[Any], pad_id: int, packed: bool = False) -> PairBatch:
    """A batch of :class:`~common.preference_data.PairExample` s (see the module doc for the layout)."""
    rows = [[p.chosen, p.rejected] for p in pairs] if packed else [r for p in pairs for r in ([p.chosen], [p.rejected])]
    base = make_batch(rows, pad_id)
    ref = [p.ref for p in pairs] if pairs and all(p.ref is not None for p in pairs) else None
    return PairBatch(**vars(base), n_pairs=len(pairs), ref=ref, rows_per_pair=1 if packed else 2)


def sequence_index(segment_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """For each position, the index of its sequence in the batch (rows in order, segments within a row); -1: padding."""
    out, offset = [], 0
    for row in segment_ids:
        out.append([offset + s - 1 if s else -1 for s in row])
        offset += max(row, default=0)
    return out


class PreferenceBackend(Protocol):
    """What a backend adds for preference methods (both torch_ft and mlx_ft implement it)."""

    def sequence_logps(self, batch: Batch, adapter: bool = True) -> list[tuple[float, int]]:
        """(log-prob sum of the target tokens, their count) per sequence, without gradients, in eval mode;
        ``adapter=False``: of the base model (the adapter disabled, not copied)."""

    def preference_forward_backward(self, batch: PairBatch, scale: float, spec: PreferenceSpec
                                    ) -> tuple[float, dict[str, float]]:
        """Accumulate gradients of ``scale * sum(pair losses)``; return the unscaled loss sum and
        the sums over pairs of :data:`METRICS` (and ORPO's)."""

    def preference_eval(self, batch: PairBatch, spec: PreferenceSpec) -> tuple[float, dict[str, float]]:
        """The same as :meth:`preference_forward_backward` without gradients (eval mode)."""


# ---------------------------------------------------------------------------
# the methods the loop runs


class SFT:
    """Supervised fine-tuning: units are supervised tokens."""

    name = "sft"
    packs_examples = True  # --packing puts several examples in one row

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def build(self, rows: Sequence[Sequence[Any]]) -> Batch:
        return make_batch(rows, self.pad_id)

    def units(self, batch: Batch) -> int:
        return batch.n_supervised

    def forward_backward(self, backend, batch: Batch, scale: float) -> float:
        return backend.forward_backward(batch, scale)

    def eval_loss(self, backend, batch: Batch) -> tuple[float, int]:
        return backend.eval_loss(batch)

    def take_metrics(self, reduce: Reduce | None = None) -> dict[str, float]:
        return {}

    def take_eval_metrics(self, reduce: Reduce | None = None) -> dict[str, float]:
        return {}


@dataclass
class _Sums:
    pairs: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, n: int, values: dict[str, float]) -> None:
        self.pairs += n
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def take(self, prefix: str = "", reduce: Reduce | None = None, keys: Sequence[str] = ()) -> dict[str, float]:
        """Means over the pairs seen since the last call; with ``reduce`` (data parallelism: the backend's
        ``all_sum``), over the pairs of every rank, the sums of ``keys`` reduced in that fixed order."""
        pairs, sums = self.pairs, self.sums
        if reduce is not None:
            names = list(keys)
            values = reduce([float(pairs)] + [float(sums.get(k, 0.0)) for k in names])
            pairs, sums = values[0], dict(zip(names, values[1:], strict=True))
        self.pairs, self.sums = 0, {}
        return {prefix + k: v / pairs for k, v in sums.items()} if pairs else {}


class Preference:
    """DPO or ORPO on pairs: units are pairs; metrics are means over the pairs of a step (or an evaluation)."""

    packs_examples = False  # a row holds one pair at most (--packing: its two answers)

    def __init__(self, spec: PreferenceSpec, pad_id: int, packed: bool = False) -> None:
        self.spec = spec
        self.name = spec.method
        self.pad_id = pad_id
        self.packed = packed
        self._train = _Sums()
        self._eval = _Sums()

    def build(self, rows: Sequence[Sequence[Any]]) -> PairBatch:
        return make_pair_batch([p for row in rows for p in row], self.pad_id, self.packed)

    def units(self, batch: PairBatch) -> int:
        return batch.n_pairs

    def forward_backward(self, backend, batch: PairBatch, scale: float) -> float:
        loss, sums = backend.preference_forward_backward(batch, scale, self.spec)
        self._train.add(batch.n_pairs, sums)
        return loss

    def eval_loss(self, backend, batch: PairBatch) -> tuple[float, int]:
        loss, sums = backend.preference_eval(batch, self.spec)
        self._eval.add(batch.n_pairs, sums)
        return loss, batch.n_pairs

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS + (ORPO_METRICS if self.spec.method == "orpo" else ())

    def take_metrics(self, reduce: Reduce | None = None) -> dict[str, float]:
        return self._train.take("", reduce, self.metric_names)

    def take_eval_metrics(self, reduce: Reduce | None = None) -> dict[str, float]:
        return self._eval.take("eval_", reduce, self.metric_names)


def for_config(cfg: Any, pad_id: int) -> SFT | Preference:
    """The method ``cfg.method`` names (``sft`` when the config has no such field)."""
    method = getattr(cfg, "method", "sft")
    if method == "sft":
        return SFT(pad_id)
    spec = PreferenceSpec(method, beta=cfg.beta, dpo_loss=cfg.dpo_loss, orpo_lambda=cfg.orpo_lambda)
    return Preference(spec, pad_id, packed=bool(cfg.packing))
