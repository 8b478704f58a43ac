"""MLX LoRA layers <-> PEFT adapters, read and written through :mod:`common.peft`.

mlx-lm keeps ``lora_a`` as (in, r) and ``lora_b`` as (r, out); PEFT's ``lora_A.weight`` is
(r, in) and ``lora_B.weight`` (out, r): both transpose on the way. Module paths are the
same on both sides (mlx-lm loads Hugging Face weight names), so the PEFT key of
``model.layers.3.self_attn.q_proj`` is ``common.peft.PREFIX + "model.layers.3.self_attn.q_proj..."``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.errors import UserError
from common.peft import (
    AdapterModule,
    config_for_modules,
    peft_config,
    peft_tensors,
    read_peft_adapter,
    write_peft_adapter,
)
from mlx_ft.lora import DoRALinear, attach_modules, detach, lora_layers


def to_numpy(a: mx.array) -> np.ndarray:
    """fp32 numpy copy (adapters are saved in fp32 whatever the compute dtype)."""
    return np.array(a.astype(mx.float32))


def export_modules(model: nn.Module) -> dict[str, AdapterModule]:
    """The model's LoRA layers in PEFT orientation (numpy, fp32)."""
    out = {}
    for path, m in lora_layers(model).items():
        mag = to_numpy(m.m) if isinstance(m, DoRALinear) else None
        out[path] = AdapterModule(a=to_numpy(m.lora_a).T, b=to_numpy(m.lora_b).T, magnitude=mag, scale=float(m.scale),
                                  alpha=getattr(m, "alpha", None) or None)
    return out


def save_peft(model: nn.Module, out_dir: str | Path, *, base_model: str | None, dropout: float,
              use_rslora: bool) -> Path:
    """Write the adapter in PEFT's format: one r and lora_alpha when all layers share them, else patterns."""
    modules = export_modules(model)
    ranks = {m.r for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    if len(ranks) == 1 and len(alphas) == 1 and None not in alphas:
        use_dora = any(m.magnitude is not None for m in modules.values())
        config = peft_config(sorted(modules), r=ranks.pop(), lora_alpha=alphas.pop(), lora_dropout=dropout,
                             use_rslora=use_rslora, use_dora=use_dora, base_model=base_model)
    else:
        config = config_for_modules(modules, use_rslora=use_rslora, lora_dropout=dropout, base_model=base_model)
    tensors = {k: np.ascontiguousarray(v) for k, v in peft_tensors(modules).items()}
    return write_peft_adapter(out_dir, tensors, config, metadata={"written_by": "llm-ft mlx"})


def structure(model: nn.Module) -> dict[str, tuple[int, bool, float]]:
    """path -> (r, is DoRA, scale) of the current LoRA layers."""
    return {p: (int(m.lora_a.shape[1]), isinstance(m, DoRALinear), float(m.scale)) for p, m in lora_layers(model).items()}


def load_peft(model: nn.Module, adapter_dir: str | Path) -> tuple[bool, dict]:
    """Load a PEFT adapter (either backend's) into ``model``.

    When the adapter's modules, ranks and DoRA-ness match the current LoRA layers the
    values are copied in place (scale taken from the adapter); otherwise the LoRA layers
    are rebuilt to match it. Returns (rebuilt, adapter config).
    """
    modules, config = read_peft_adapter(adapter_dir)
    wanted = {p: (m.r, m.magnitude is not None) for p, m in modules.items()}
    current = {p: s[:2] for p, s in structure(model).items()}
    rebuilt = wanted != current
    if rebuilt:
        detach(model)
        attach_modules(model, {p: {"r": m.r, "alpha": m.alpha, "scale": m.scale, "dora": m.magnitude is not None}
                               for p, m in modules.items()}, float(config.get("lora_dropout", 0.0)))
    layers = lora_layers(model)
    problems = []
    for path, m in modules.items():
        layer = layers[path]
        in_dims, out_dims = layer.lora_a.shape[0], layer.lora_b.shape[1]
        if m.a.shape != (m.r, in_dims) or m.b.shape != (out_dims, m.r):
            problems.append(f"{path}: lora_A {m.a.shape} / lora_B {m.b.shape} do not fit a {in_dims}->{out_dims} layer")
            continue
        layer.lora_a = mx.array(np.ascontiguousarray(m.a.T), dtype=mx.float32)
        layer.lora_b = mx.array(np.ascontiguousarray(m.b.T), dtype=mx.float32)
        if m.magnitude is not None:
            layer.m = mx.array(m.magnitude, dtype=mx.float32)
        layer.scale = m.scale
        layer.alpha = m.alpha
    if problems:
        raise UserError(f"{adapter_dir}: the adapter does not fit this model", problems)
    mx.eval(model.trainable_parameters())
    return rebuilt, config
