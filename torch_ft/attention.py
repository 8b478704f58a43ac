"""Variable-length attention on CUDA: each example in a packed row attends only to itself.

With SDPA, a packed row needs a dense block-diagonal mask, so attention is computed over
the whole T x T square (a 4096-token row of ~200-token examples does ~20x the attention
work it needs) by a kernel that takes a mask, and SDPA's cuDNN backend re-plans for every
new row length (measured: 2-4 s stalls on an H100). torch's ``varlen_attn`` runs
Flash-Attention over the examples given by cumulative lengths: no mask, no wasted blocks.

It is registered with transformers as the attention implementation ``ATTN_NAME``. Calls
that carry no ``CU_SEQLENS`` (generation, or a layer with a sliding window or logit
softcap, which ``varlen_attn`` does not do on every torch version) fall through to SDPA
with the mask transformers builds, which already follows packed ``position_ids``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence

import torch

ATTN_NAME = "llm_ft_varlen"
CU_SEQLENS = "llm_ft_cu_seqlens"  # int32 (N+1,): where each segment starts in the flattened batch
MAX_SEQLEN = "llm_ft_max_seqlen"  # int: the longest segment
calls = {"varlen": 0, "sdpa": 0}  # per-layer calls by path: how checks see which one ran


@functools.cache
def _varlen():
    """(varlen_attn, keyword arguments for causal attention, native GQA?) or None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:  # torch 2.10-2.11
        causal = {"is_causal": True}
    elif "window_size" in params:  # later: causal is a (left, right=0) window
        causal = {"window_size": (-1, 0)}
    else:
        return None
    gqa = "enable_gqa" in params
    if gqa:
        causal["enable_gqa"] = True
    return varlen_attn, causal, gqa, "scale" in params


@functools.cache
def _native_gqa() -> bool:
    """Flash-Attention takes fewer KV heads than query heads as they are; torch versions without
    an ``enable_gqa`` flag pass them through (measured exact on torch 2.11). Probed once."""
    varlen_attn, causal, _, _ = _varlen()
    q = torch.ones(2, 4, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.ones(2, 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 2], dtype=torch.int32, device="cuda")
    try:
        out = varlen_attn(q, kv, kv, cu, cu, 2, 2, **causal)
    except (RuntimeError, ValueError):
        return False
    return out.shape == q.shape


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """varlen attention needs an NVIDIA GPU, half precision and a torch that has it."""
    return (device.type == "cuda" and torch.version.hip is None and dtype in (torch.float16, torch.bfloat16)
            and _varlen() is not None)


def register() -> str:
    """Make ``ATTN_NAME`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, varlen_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)  # for the SDPA fall-through
    return ATTN_NAME


def segment_bounds(segment_ids: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Cumulative segment starts over the row-major flattened batch, and the longest segment.

    Every token belongs to exactly one segment: each example of a row, and the row's
    padding (segment 0) as one more, so the attention output covers every position.
    """
    bounds = [0]
    longest = 0
    offset = 0
    for row in segment_ids:
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                bounds.append(offset + t)
                longest = max(longest, t - start)
                start = t
        offset += len(row)
    return bounds, longest


def varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs):
    """transformers' attention-function contract: (B, H, T, D) inputs, (B, T, H, D) output."""
    cu = kwargs.pop(CU_SEQLENS, None)
    longest = kwargs.pop(MAX_SEQLEN, None)
    impl = _varlen()
    if query.dtype == torch.float32 and query.is_cuda and torch.is_autocast_enabled("cuda"):
        # fp32 norms or embeddings (a model that keeps them so) make RoPE promote q and k to fp32 under autocast.
        half = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(half), key.to(half), value.to(half)
    if (cu is None or impl is None or kwargs.get("sliding_window") or kwargs.get("softcap")
            or query.dtype not in (torch.float16, torch.bfloat16) or dropout):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        calls["sdpa"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    varlen_attn, causal, gqa, has_scale = impl
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, hkv, d)
    v = value.transpose(1, 2).reshape(b * t, hkv, value.shape[-1])
    if hkv != hq and not gqa and not _native_gqa():
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    extra = dict(causal)
    if scaling is not None and not math.isclose(scaling, d ** -0.5, rel_tol=1e-6):
        if has_scale:
            extra["scale"] = scaling
        else:
            q = q * (scaling * d ** 0.5)
    calls["varlen"] += 1
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return out.view(b, t, hq, -1), None
