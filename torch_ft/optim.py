"""Optimizers: AdamW (fused where the device has a fused kernel) and bitsandbytes' 8-bit AdamW."""

from __future__ import annotations

import importlib.util

import torch

from common.errors import UserError
from torch_ft.device import Precision

BETAS = (0.9, 0.999)
EPS = 1e-8


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay the LoRA matrices; never decay vectors (DoRA magnitudes, biases, norms)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(name: str, model, *, lr: float, weight_decay: float, prec: Precision):
    """The optimizer for ``name`` and notes for the user (e.g. a fallback taken)."""
    groups = param_groups(model, weight_decay)
    notes: list[str] = []
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        if prec.kind in ("cuda", "rocm") and importlib.util.find_spec("bitsandbytes") is not None:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
            return cls(groups, lr=lr, betas=BETAS, eps=EPS), notes
        if prec.kind in ("cuda", "rocm"):
            raise UserError(f"--optim {name} needs bitsandbytes: pip install bitsandbytes (or use --optim adamw)")
        # A LoRA's optimizer state is small; 8-bit only saves memory, it does not change the recipe.
        notes.append(f"--optim {name}: bitsandbytes optimizers need a CUDA GPU; using adamw on {prec.device}")
    elif name != "adamw":
        raise UserError(f"unknown optimizer {name!r}: choose adamw, adamw_8bit or paged_adamw_8bit")
    if prec.kind in ("cuda", "rocm", "cpu"):
        try:  # one kernel for all parameters instead of a loop of small ones
            return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, fused=True), notes
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS), notes
