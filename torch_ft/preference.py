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

from common.train.methods import PairBatch, PreferenceSpec, sequence_index
from torch_ft import attention
from torch_ft import device as devices
from torch_ft.loss import LOGITS_BUDGET, _logit_transform, to_device
from torch_ft.plan import rows_per_pass

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
    inputs, loss_mask, _ = backend._inputs(batch)
    seq = to_device(sequence_index(batch.segment_ids), backend.prec.device)
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


def _rows_per_pass(backend, batch) -> int:
    rows = len(batch.input_ids)
    return rows_per_pass(rows, len(batch.input_ids[0]) if rows else 0, backend.prec.kind)


def _sequence_groups(backend, batch: PairBatch, per: int):
    """The batch's rows in groups of ``per``: model inputs, sequence index within the group, the group's
    first sequence in the batch and its number of sequences."""
    for i in range(0, len(batch.input_ids), per):
        part = batch.rows(i, i + per)
        first = sum(max(r, default=0) for r in batch.segment_ids[:i])
        inputs, loss_mask, seq = _prepared(backend, part)
        yield inputs, loss_mask, seq, first, sum(max(r, default=0) for r in part.segment_ids)


def _two_stage(backend, batch: PairBatch, scale: float, spec: PreferenceSpec, per: int) -> tuple[float, dict]:
    """Gradients of the pair losses with row groups smaller than a pair (the CPU, rows of more than
    CPU_TOKENS_PER_PASS / 2 tokens): as SFT, one group's activations at a time.

    A pair's loss depends on each answer only through its log-prob sum, so its gradient is
    ``sum_s dL/dlogp_s * grad(logp_s)``: the sums come from a pass without gradients, the
    coefficients from the loss on those sums, then each group runs forward and backward once
    with its coefficients. Exact, for one more forward pass.
    """
    n_seq = 2 * batch.n_pairs
    sums = torch.zeros(n_seq, dtype=torch.float32, device=backend.prec.device)
    counts = torch.zeros(n_seq, dtype=torch.float32, device=backend.prec.device)
    ref = None
    if spec.needs_reference and batch.ref is not None:
        ref = torch.tensor(batch.ref, dtype=torch.float32, device=sums.device)
    elif spec.needs_reference:
        ref = torch.zeros(n_seq, dtype=torch.float32, device=sums.device)
    with torch.no_grad(), devices.autocast(backend.prec):
        for inputs, loss_mask, seq, first, n in _sequence_groups(backend, batch, per):
            s, c = sequence_sums(backend.causal_lm, inputs, loss_mask, seq, n)
            sums[first:first + n], counts[first:first + n] = s, c.float()
            if spec.needs_reference and batch.ref is None:
                with backend.model.disable_adapter():
                    ref[first:first + n] = sequence_sums(backend.causal_lm, inputs, loss_mask, seq, n)[0]
    if ref is not None:
        ref = ref.view(-1, 2)
    leaf = sums.clone().requires_grad_(True)
    losses, metrics = pair_losses(spec, leaf[0::2], leaf[1::2], counts[0::2], counts[1::2],
                                  *((ref[:, 0], ref[:, 1]) if ref is not None else (None, None)))
    loss_sum = losses.sum()
    (coef,) = torch.autograd.grad(loss_sum, leaf)
    coef = coef * scale
    value = float(loss_sum.detach())
    if value != value or value in (float("inf"), float("-inf")):
        backend._nonfinite = True
        return value, _sums(metrics)
    for inputs, loss_mask, seq, first, n in _sequence_groups(backend, batch, per):
        with devices.autocast(backend.prec):
            s, _ = sequence_sums(backend.causal_lm, inputs, loss_mask, seq, n)
        part = (s * coef[first:first + n]).sum()
        (backend.scaler.scale(part) if backend.scaler is not None else part).backward()
    return value, _sums(metrics)


def _sums(metrics: dict) -> dict[str, float]:
    return {k: float(v.sum()) for k, v in metrics.items()}


def forward_backward(backend, batch: PairBatch, scale: float, spec: PreferenceSpec) -> tuple[float, dict]:
    """Gradients of ``scale * sum(pair losses)``; (loss sum, metric sums). The whole batch in one pass,
    unless the CPU's row groups (torch_ft.plan.rows_per_pass) are smaller: then two stages."""
    backend._train_mode(True)
    per = _rows_per_pass(backend, batch)
    if per < len(batch.input_ids):
        return _two_stage(backend, batch, scale, spec, per)
    losses, metrics = _pair_step(backend, batch, spec)
    loss_sum = losses.sum()
    loss = loss_sum * scale
    (backend.scaler.scale(loss) if backend.scaler is not None else loss).backward()
    value = float(loss_sum.detach())  # read after backward: no sync between forward and backward
    if value != value or value in (float("inf"), float("-inf")):
        backend._nonfinite = True  # its gradients are NaN too: the step will be skipped
    return value, _sums(metrics)


@torch.no_grad()
def evaluate(backend, batch: PairBatch, spec: PreferenceSpec) -> tuple[float, dict]:
    backend._train_mode(False)
    losses, metrics = _pair_step(backend, batch, spec)
    return float(losses.sum()), _sums(metrics)
