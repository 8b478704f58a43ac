"""LoRA and DoRA layers on mlx-lm models, with PEFT's meaning of every knob.

Layers keep mlx-lm's layout (``lora_a`` (in, r), ``lora_b`` (r, out), DoRA's ``m`` (out,))
so mlx-lm's own tools read them; :mod:`mlx_ft.peft_format` transposes to PEFT's on save.

Same semantics as peft's ``LoraLayer`` (the torch backend):
- ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), applied to ``B A dropout(x)``;
- A ~ U(-1/sqrt(in), 1/sqrt(in)), which is what ``kaiming_uniform_(a=sqrt(5))`` draws
  for a (r, in) weight, and B = 0; DoRA's magnitude starts at the row norms of W;
- DoRA: ``m / ||W + scale B A||`` (the norm detached), and with dropout active the base
  term of the DoRA correction sees the dropped input, as in ``peft.tuners.lora.dora``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.dora import DoRALinear as _MlxLmDoRALinear
from mlx_lm.tuner.lora import LoRALinear as _MlxLmLoRALinear

from common.adapters import lora_scale
from common.errors import UserError

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


class LoRALinear(_MlxLmLoRALinear):
    """mlx-lm's LoRA layer (its forward already equals peft's); remembers its alpha."""

    alpha: float = 0.0


class DoRALinear(_MlxLmDoRALinear):
    """DoRA computed the way peft computes it (also under dropout)."""

    alpha: float = 0.0

    def __call__(self, x):
        w = self._dequantized_weight()
        base = self.linear(x)  # W x + bias, on the undropped input
        xd = self.dropout(x)
        lora = ((xd @ self.lora_a) @ self.lora_b) * self.scale
        adapted = w + (self.scale * self.lora_b.T) @ self.lora_a.T
        norm = mx.stop_gradient(mx.linalg.norm(adapted.astype(mx.float32), axis=1))
        mag = (self.m / norm).astype(x.dtype)
        if xd is x:  # no dropout (p = 0 or eval mode)
            wx = base - self.linear.bias if "bias" in self.linear else base
        else:  # peft recomputes W x on the dropped input for the DoRA correction
            wx = xd @ w.T.astype(x.dtype)
        return base + (mag - 1) * wx + mag * lora.astype(x.dtype)


@dataclass
class LoraSpec:
    """What to adapt and how: the training config's LoRA fields."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    num_layers: int | None = None  # last N blocks; None = all
    use_dora: bool = False
    use_rslora: bool = False

    @classmethod
    def from_config(cls, cfg) -> LoraSpec:
        return cls(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.targets), cfg.num_layers,
                   cfg.use_dora, cfg.use_rslora)


def block_paths(model: nn.Module) -> list[str]:
    """Module path of each transformer block (``model.layers.0``, ...), in order."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(b)] for b in model.layers]


def candidate_linears(model: nn.Module, targets: list[str], num_layers: int | None) -> tuple[dict[str, nn.Module], list[str]]:
    """Linear layers inside the selected blocks whose leaf name is a target.

    Returns (path -> module, targets the architecture lacks). 'all-linear' selects every
    linear layer inside the blocks (peft's meaning: the output head is never adapted).
    """
    blocks = list(model.layers)
    if num_layers is not None and not 1 <= num_layers <= len(blocks):
        raise UserError(f"--num-layers {num_layers}: the model has {len(blocks)} layers")
    first = 0 if num_layers is None else len(blocks) - num_layers
    prefixes = block_paths(model)
    everything = "all-linear" in targets
    found: dict[str, nn.Module] = {}
    for i in range(first, len(blocks)):
        for rel, m in blocks[i].named_modules():
            leaf = rel.rsplit(".", 1)[-1]
            if isinstance(m, LINEAR_TYPES) and (everything or leaf in targets):
                found[f"{prefixes[i]}.{rel}"] = m
    seen = {p.rsplit(".", 1)[-1] for p in found}
    missing = [] if everything else [t for t in targets if t not in seen]
    return found, missing


def make_layer(base: nn.Module, r: int, alpha: float | None, dropout: float, use_dora: bool, use_rslora: bool,
               scale: float | None = None) -> nn.Module:
    """Wrap one linear (or quantized linear) layer; A drawn from the global MLX key."""
    out_dims, in_dims = base.weight.shape
    if isinstance(base, nn.QuantizedLinear):
        in_dims = in_dims * 32 // base.bits  # packed: 32 // bits values per uint32
    cls = DoRALinear if use_dora else LoRALinear
    # mlx-lm's from_base would build its own class; construct ours, then hang the base in.
    layer = cls(in_dims, out_dims, r=r, dropout=dropout, scale=lora_scale(alpha, r, use_rslora) if scale is None else scale)
    if use_dora:
        layer.set_linear(base)  # also sets the magnitude to W's row norms
    else:
        layer.linear = base
    layer.alpha = None if alpha is None else float(alpha)
    return layer


def attach(model: nn.Module, spec: LoraSpec) -> tuple[list[str], list[str]]:
    """Freeze the base and put LoRA/DoRA on the targets; returns (adapted paths, missing targets)."""
    model.freeze()
    found, missing = candidate_linears(model, spec.targets, spec.num_layers)
    if not found:
        raise UserError(f"targets {spec.targets}: none of these modules exists in the selected layers of this "
                        "model", problems=[f"linear layers it has: {', '.join(sorted(linear_leaf_names(model)))}"])
    new = [(p, make_layer(m, spec.r, spec.alpha, spec.dropout, spec.use_dora, spec.use_rslora))
           for p, m in found.items()]
    model.update_modules(tree_unflatten(new))
    return list(found), missing


def attach_modules(model: nn.Module, layers: dict[str, dict], dropout: float) -> None:
    """Put LoRA/DoRA layers exactly on ``layers`` (path -> {r, alpha, scale, dora}), freezing the base."""
    model.freeze()
    modules = dict(model.named_modules())
    problems = [f"{p}: no such linear layer in this model" for p in layers
                if not isinstance(modules.get(p), LINEAR_TYPES)]
    if problems:
        raise UserError("the adapter does not fit this model", problems)
    new = [(p, make_layer(modules[p], s["r"], s["alpha"], dropout, s["dora"], False, scale=s["scale"]))
           for p, s in layers.items()]
    model.update_modules(tree_unflatten(new))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """path -> LoRA/DoRA layer, in model order."""
    return {p: m for p, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


def detach(model: nn.Module) -> None:
    """Replace every LoRA/DoRA layer by the base layer it wraps."""
    restored = [(p, m.linear) for p, m in lora_layers(model).items()]
    if restored:
        model.update_modules(tree_unflatten(restored))


def linear_leaf_names(model: nn.Module) -> set[str]:
    """Leaf names of the linear layers inside the transformer blocks (what --targets may name)."""
    return {rel.rsplit(".", 1)[-1] for b in model.layers for rel, m in b.named_modules()
            if isinstance(m, LINEAR_TYPES)}


def init_scale_bound(in_features: int) -> float:
    """The bound of A's uniform init: kaiming_uniform(a=sqrt(5)) for fan_in=in gives 1/sqrt(in)."""
    gain = math.sqrt(2.0 / (1 + 5))
    return math.sqrt(3.0) * gain / math.sqrt(in_features)
