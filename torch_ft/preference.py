"""DPO and ORPO on the torch backend: per-sequence log-probs and the pair losses.

The log-prob of an answer is the sum of its target tokens' log-probs (the loss mask's
tokens), computed from hidden states at those positions only, in chunks of the output
head as :mod:`torch_ft.loss` does. The reference pass of DPO runs the same model under
peft's ``disable_adapter()`` without gradients: no second copy of the weights, and its
activations are freed layer by layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.train.backend import rows_per_pass
from common.train.methods import PairBatch, PreferenceSpec, sequence_index
from torch_ft import attention
from torch_ft import device as devices
from torch_ft.loss import LOGITS_BUDGET, _logit_transform

FLAT_MULTIPLE = 256  # as torch_ft.backend pads a flattened CUDA row


def _chunk_logps(head, transform, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = transform(head(hidden).float())
    return -F.cross_entropy(logits, targets, reduction="none")


def sequence_sums(causal_lm, inputs: dict, loss_mask: torch.Tensor, seq: torch.Tensor,
                  n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob sums (n_seq,) fp32, target counts (n_seq,)) of the sequences of a batch.

    ``seq[r, t]`` is the sequence index of position t (-1 padding); a target at t+1 belongs
    to the sequence of t+1 (a segment's first token is never a target).
    """
    decoder = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    select = loss_mask[:, 1:].bool()
    h = hidden[:, :-1][select]
    targets = inputs["input_ids"][:, 1:][select]
    index = seq[:, 1:][select]
    transform = _logit_transform(causal_lm.config)
    chunk = max(128, LOGITS_BUDGET // head.weight.shape[0])
    parts = []
    for s in range(0, int(targets.numel()), chunk):
        args = (head, transform, h[s:s + chunk], targets[s:s + chunk])
        if torch.is_grad_enabled() and targets.numel() > chunk:
            parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False))  # logits recomputed in backward
        else:
            parts.append(_chunk_logps(*args))
    logps = torch.cat(parts) if parts else hidden.sum()[None][:0].float()
    sums = torch.zeros(n_seq, dtype=torch.float32, device=hidden.device).index_add(0, index, logps)
    counts = torch.bincount(index, minlength=n_seq)
    if not parts:
        sums = sums + hidden.sum() * 0.0  # keeps the graph connected
    return sums, counts


def pair_losses(spec: PreferenceSpec, pc, pr, nc, nr, rc=None, rr=None) -> tuple[torch.Tensor, dict]:
    """Per-pair losses and metrics from policy (p) and reference (r) log-prob sums and token counts (n)."""
    if spec.length_average:
        pc, pr = pc / nc, pr / nr
        if rc is not None:
            rc, rr = rc / nc, rr / nr
    if spec.method == "orpo":
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        ratio = F.logsigmoid(log_odds)
        losses = -pc - spec.orpo_lambda * ratio
        chosen, rejected = spec.orpo_lambda * pc.detach(), spec.orpo_lambda * pr.detach()
        extra = {"nll_loss": -pc.detach(), "log_odds_ratio": ratio.detach()}
    else:
        chosen_ratio, rejected_ratio = pc - rc, pr - rr
        h = chosen_ratio - rejected_ratio
        losses = -F.logsigmoid(spec.beta * h) if spec.dpo_loss == "sigmoid" else (h - 1 / (2 * spec.beta)) ** 2
        chosen, rejected = spec.beta * chosen_ratio.detach(), spec.beta * rejected_ratio.detach()
        extra = {}
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/accuracies": (chosen > rejected).float(), "logps/chosen": pc.detach(),
               "logps/rejected": pr.detach(), **extra}
    return losses, metrics


def _prepared(backend, batch):
    if backend.attn_impl == attention.ATTN_NAME:  # the backend runs rows end to end: index that layout
        batch = batch.flat(FLAT_MULTIPLE if backend.prec.kind == "cuda" else 1, backend.pad_id)
    inputs, loss_mask = backend._inputs(batch)
    seq = torch.tensor(sequence_index(batch.segment_ids), dtype=torch.long, device=backend.prec.device)
    return inputs, loss_mask, seq


def sequence_logps(backend, batch, adapter: bool = True) -> list[tuple[float, int]]:
    """(sum, count) per sequence without gradients, in eval mode; ``adapter=False``: the base model."""
    n_seq = sum(max(r, default=0) for r in batch.segment_ids)
    backend._train_mode(False)
    inputs, loss_mask, seq = _prepared(backend, batch)
    with torch.no_grad(), devices.autocast(backend.prec), (
            backend.model.disable_adapter() if not adapter else _Nothing()):
        sums, counts = sequence_sums(backend.causal_lm, inputs, loss_mask, seq, n_seq)
    return list(zip(sums.tolist(), counts.tolist(), strict=True))


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pair_step(backend, part: PairBatch, spec: PreferenceSpec) -> tuple[torch.Tensor, dict]:
    inputs, loss_mask, seq = _prepared(backend, part)
    n_seq = 2 * part.n_pairs
    with devices.autocast(backend.prec):
        sums, counts = sequence_sums(backend.causal_lm, inputs, loss_mask, seq, n_seq)
        rc = rr = None
        if spec.needs_reference:
            if part.ref is not None:
                ref = torch.tensor(part.ref, dtype=torch.float32, device=sums.device)
            else:
                with torch.no_grad(), backend.model.disable_adapter():
                    ref = sequence_sums(backend.causal_lm, inputs, loss_mask, seq, n_seq)[0].view(-1, 2)
            rc, rr = ref[:, 0], ref[:, 1]
    counts = counts.to(torch.float32)
    return pair_losses(spec, sums[0::2], sums[1::2], counts[0::2], counts[1::2], rc, rr)


def _parts(backend, batch: PairBatch) -> list[PairBatch]:
    """The batch in groups of pairs (on the CPU only, as the backend splits SFT batches in row groups)."""
    rows = len(batch.input_ids)
    per = rows_per_pass(rows, len(batch.input_ids[0]) if rows else 0, backend.prec.kind)
    if per >= rows:
        return [batch]
    step = max(1, per // batch.rows_per_pair)
    return [batch.pairs(i, min(i + step, batch.n_pairs)) for i in range(0, batch.n_pairs, step)]


def _sums(metrics: dict) -> dict[str, float]:
    return {k: float(v.sum()) for k, v in metrics.items()}


def forward_backward(backend, batch: PairBatch, scale: float, spec: PreferenceSpec) -> tuple[float, dict]:
    """Gradients of ``scale * sum(pair losses)``; (loss sum, metric sums). Pair losses are independent,
    so groups of pairs add up to the same gradient."""
    backend._train_mode(True)
    total, sums = 0.0, {}
    for part in _parts(backend, batch):
        losses, metrics = _pair_step(backend, part, spec)
        loss_sum = losses.sum()
        loss = loss_sum * scale
        (backend.scaler.scale(loss) if backend.scaler is not None else loss).backward()
        value = float(loss_sum.detach())
        total += value
        for k, v in _sums(metrics).items():
            sums[k] = sums.get(k, 0.0) + v
        if value != value or value in (float("inf"), float("-inf")):
            backend._nonfinite = True
            break
    return total, sums


@torch.no_grad()
def evaluate(backend, batch: PairBatch, spec: PreferenceSpec) -> tuple[float, dict]:
    backend._train_mode(False)
    losses, metrics = _pair_step(backend, batch, spec)
    return float(losses.sum()), _sums(metrics)
