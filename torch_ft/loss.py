"""Model inputs for a Batch (padding, packing) and a chunked cross-entropy.

The loss is computed from the decoder's hidden states at the supervised positions only,
``CHUNK`` positions at a time: full-vocabulary fp32 logits are never built for the whole
batch (for a 49k vocabulary and 8x2048 tokens that would be 3.2 GB), and prompt tokens,
which are most tokens in instruction data, cost no lm_head matmul at all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.train.backend import Batch
from torch_ft import attention
from torch_ft.plan import LOGITS_BUDGET  # fp32 logits per chunk (tests and benches patch it here)


def to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (a list or array) as a tensor on ``device``. To a GPU through pinned memory and
    without waiting for the copy: a plain copy from pageable memory makes the CPU wait for the GPU's
    whole queue, and the GPU then idles while the CPU catches up (the caching host allocator keeps
    the pinned buffer until the copy is done)."""
    t = torch.as_tensor(np.asarray(values), dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def target_positions(loss_mask: list[list[int]]) -> np.ndarray:
    """Flat positions ``r * T + t`` of a (rows, T) batch whose next token (t + 1) is a target, from the
    host's loss mask: the loss gathers them without a device-to-host round trip."""
    mask = np.asarray(loss_mask, dtype=bool)
    if mask.size == 0:
        return np.zeros(0, dtype=np.int64)
    rows, cols = np.nonzero(mask[:, 1:])
    return rows.astype(np.int64) * mask.shape[1] + cols


def model_inputs(batch: Batch, device: torch.device, mask_dtype: torch.dtype, attn_impl: str) -> dict:
    """input_ids plus what keeps attention inside each example and off the padding.

    With our varlen attention (CUDA) every row, packed or not, goes as segment bounds
    (no mask). Otherwise unpacked rows get a 2D padding mask; packed rows get position_ids
    that restart per example and, for SDPA/eager, a 4D block-diagonal causal additive mask;
    flash-attention 2 instead finds the examples from the position_ids.
    """
    ids = to_device(batch.input_ids, device)
    pos = to_device(batch.position_ids, device)
    if attn_impl == attention.ATTN_NAME:
        bounds, longest = attention.segment_bounds(batch.segment_ids)
        return {"input_ids": ids, "position_ids": pos, attention.CU_SEQLENS: to_device(bounds, device, torch.int32),
                attention.MAX_SEQLEN: longest}
    seg = to_device(batch.segment_ids, device)
    packed = any(max(row, default=0) > 1 for row in batch.segment_ids)
    if not packed:
        return {"input_ids": ids, "attention_mask": (seg > 0).long(), "position_ids": pos}
    if attn_impl.startswith("flash"):
        return {"input_ids": ids, "position_ids": pos}
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    allowed = (same & causal) | torch.eye(t, dtype=torch.bool, device=device)  # padding sees itself: no NaN rows
    # finfo.min, not -inf: a row can never be all -inf, so softmax stays finite.
    mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=device).masked_fill(~allowed, torch.finfo(mask_dtype).min)
    return {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": pos}


def _logit_transform(config):
    """Model-specific logit scaling that the CausalLM head applies after lm_head."""
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    divide = getattr(config, "logits_scaling", None)  # Granite divides

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale not in (None, 1, 1.0):
            logits = logits * scale
        if divide not in (None, 1, 1.0):
            logits = logits / divide
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


def _chunk_loss(head, transform, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = transform(head(hidden).float())
    return F.cross_entropy(logits, targets, reduction="sum")


def supervised_loss(causal_lm, inputs: dict, loss_mask: torch.Tensor,
                    picks: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of targets) for ``inputs`` under ``loss_mask``.

    ``causal_lm`` is the transformers CausalLM (LoRA layers injected); its decoder gives
    hidden states and its output embeddings give logits, chunk by chunk. ``picks``: the
    positions of ``target_positions(loss_mask)`` on the device, which spares the GPU a
    synchronisation (selecting by a device mask must read how many positions it holds).
    """
    decoder = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    if picks is not None:  # flat positions t whose target t+1 is supervised
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, picks)  # (N, H)
        targets = inputs["input_ids"].reshape(-1).index_select(0, picks + 1)
    else:
        select = loss_mask[:, 1:].bool()  # target at t+1 is predicted from position t
        h = hidden[:, :-1][select]  # (N, H)
        targets = inputs["input_ids"][:, 1:][select]
    n = int(targets.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected; contributes nothing
    transform = _logit_transform(causal_lm.config)
    vocab = head.weight.shape[0]
    chunk = max(128, LOGITS_BUDGET // vocab)
    if n <= chunk:
        return _chunk_loss(head, transform, h, targets), n
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        hs, ts = h[s:s + chunk], targets[s:s + chunk]
        if torch.is_grad_enabled():
            # Recompute each chunk's logits in backward instead of keeping all of them.
            total = total + checkpoint(_chunk_loss, head, transform, hs, ts, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, transform, hs, ts)
    return total, n
