"""A leaner forward for peft's plain LoRA layers: ``base(x) + (dropout(x) A^T * s) B^T`` in one addmm.

peft computes ``result + lora_B(lora_A(x)) * scaling``: two more full-size (tokens x out)
tensors per layer, the product and the scaled product, then a third for the sum; backward
repeats the scaling at full size. Here the scaling is applied to the rank-r intermediate
and ``torch.addmm`` adds the low-rank product into the base output: the same function and
the same parameters (saved adapters are unchanged), fewer kernels (GPU launches) and fewer
short-lived tensors. On the CPU the short-lived tensors matter most: glibc's heap cannot
hand their holes back, and with SmolLM2-135M on data/ this cut peak RSS by ~130 MB (of
~1.2 GB private) at the same speed.

Only the plain case takes the new path (one active adapter, not merged, no DoRA or other
variant, no extra forward arguments, dtypes that addmm accepts); anything else runs peft's
own forward.

Projections that read the same input (attention's q, k and v; the MLP's gate and up) train as
one autograd node, :class:`SharedInput`: peft runs them one by one, so each adapter's
``lora_A`` reads the input again, and backward gets six (attention) or four (MLP) full-size
gradients of that input, which autograd sums one kernel at a time. Here the group's A matrices
are stacked into one (r1+r2+..., in) matmul each way, and the input's gradient is written once:
the first frozen base's matmul makes it and every other base and the stacked adapters add
into it inside their matmuls (``addmm_``). Unsloth's LoRA QKV and MLP kernels do the same.
Only in training forwards of plain adapters over an ``nn.Linear`` or bitsandbytes 4-bit base;
tests/test_lean_mlp.py compares losses and gradients with peft's forward.
"""

from __future__ import annotations

import types

import torch


def _lean_forward(self, x: torch.Tensor, *args, _peft_forward, **kwargs) -> torch.Tensor:
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return _peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    if name in self.lora_variant or name not in self.lora_A:
        return _peft_forward(x, *args, **kwargs)
    group = self.__dict__.get("_lora_group")
    if group is not None and torch.is_grad_enabled():
        out = group.output(self, x)
        if out is not None:
            return out
    lora_b = self.lora_B[name].weight
    result = self.base_layer(x)
    if result.dtype != lora_b.dtype and not torch.is_autocast_enabled(x.device.type):
        return _peft_forward(x, *args, **kwargs)  # e.g. a bf16 base with fp32 adapters and no autocast
    low = self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name]  # (..., r): the scaling costs r, not out
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), lora_b.t())
    return out.view(result.shape)


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's (out, in) weight in ``dtype`` (a 4-bit one dequantised, as bitsandbytes' backward does)."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)
    return w.to(dtype)


def plain_adapter(layer) -> str | None:
    """The adapter name when ``layer`` is a peft LoRA linear with one active plain adapter (no dropout,
    DoRA or other variant, not merged) over an ``nn.Linear`` or bitsandbytes 4-bit base, else None."""
    names = getattr(layer, "active_adapters", None)
    if not names or len(names) != 1 or getattr(layer, "merged", True) or getattr(layer, "disable_adapters", True):
        return None
    name = names[0]
    if name not in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.base_layer
    dense = type(base) is torch.nn.Linear
    four_bit = getattr(getattr(base, "weight", None), "quant_state", None) is not None
    return name if dense or four_bit else None


class SharedInput(torch.autograd.Function):
    """``base_i(x) + s_i (x A_i^T) B_i^T`` for each layer i of a group that reads the same ``x``.

    Keeps ``x`` and the stacked, scaled ``x A^T`` (tokens x sum of ranks), as peft's layers do between them.
    """

    @staticmethod
    def forward(ctx, x, bases, scalings, *ab):
        a, b = ab[0::2], ab[1::2]
        outs = [base(x) for base in bases]
        dt = outs[0].dtype
        flat = x.reshape(-1, x.shape[-1]).to(dt)
        ranks = [w.shape[0] for w in a]
        stacked_a = torch.cat(a).to(dt)  # (sum of ranks, in), kept for backward: a few hundred KB
        low = _scaled(flat @ stacked_a.t(), scalings, ranks)  # (tokens, sum of ranks)
        b_dt = [w.to(dt) for w in b]
        for out, part, w in zip(outs, low.split(ranks, dim=1), b_dt, strict=True):
            out.view(-1, out.shape[-1]).addmm_(part, w.t())
        ctx.save_for_backward(x, low, *ab)
        ctx.bases, ctx.scalings, ctx.ranks, ctx.dt, ctx.stacked_a, ctx.b_dt = bases, scalings, ranks, dt, stacked_a, b_dt
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # unused outputs' gradients arrive as zeros (materialize_grads)
        x, low, *ab = ctx.saved_tensors
        a, b = ab[0::2], ab[1::2]
        dt, ranks, needs = ctx.dt, ctx.ranks, ctx.needs_input_grad
        dys = [g.reshape(-1, g.shape[-1]).to(dt) for g in grads]
        d_low = _scaled(torch.cat([dy @ w for dy, w in zip(dys, ctx.b_dt, strict=True)], dim=1), ctx.scalings, ranks)
        grad_a = (d_low.t() @ x.reshape(-1, x.shape[-1]).to(dt)).split(ranks) if any(needs[3::2]) else None
        out: list = [None, None, None]
        for i, (dy, part) in enumerate(zip(dys, low.split(ranks, dim=1), strict=True)):
            out.append(grad_a[i].to(a[i].dtype) if needs[3 + 2 * i] else None)
            out.append((dy.t() @ part).to(b[i].dtype) if needs[4 + 2 * i] else None)
        if needs[0]:
            dx = dys[0] @ dense_weight(ctx.bases[0], dt)
            for dy, base in zip(dys[1:], ctx.bases[1:], strict=True):
                dx.addmm_(dy, dense_weight(base, dt))
            dx.addmm_(d_low, ctx.stacked_a)
            out[0] = dx.view(x.shape).to(x.dtype)
        ctx.stacked_a = ctx.b_dt = None
        return tuple(out)


def _scaled(low: torch.Tensor, scalings: list[float], ranks: list[int]) -> torch.Tensor:
    """``low`` (tokens, sum of ranks) with each adapter's columns times its scaling, in place."""
    if len(set(scalings)) == 1:
        return low.mul_(scalings[0])
    for part, s in zip(low.split(ranks, dim=1), scalings, strict=True):
        part.mul_(s)
    return low


class _Group:
    """Layers of one module that read the same input; the first to be called computes them all."""

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self._x: torch.Tensor | None = None
        self._outs: dict[int, torch.Tensor] = {}

    def output(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        if self._x is not x or id(layer) not in self._outs:
            names = [plain_adapter(m) for m in self.layers]
            if None in names:
                return None
            outs = SharedInput.apply(x, [m.base_layer for m in self.layers], [m.scaling[n] for m, n in zip(self.layers, names, strict=True)],
                                     *[w for m, n in zip(self.layers, names, strict=True) for w in (m.lora_A[n].weight, m.lora_B[n].weight)])
            self._x, self._outs = x, {id(m): o for m, o in zip(self.layers, outs, strict=True)}
        out = self._outs.pop(id(layer))
        if not self._outs:
            self._x = None  # every layer has taken its output: hold nothing between forwards
        return out


# sibling projections that read the same input, by the name of their parent's attribute
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def install(model, autocast: bool = False, group: bool = True) -> int:
    """Give every plain peft LoRA linear layer of ``model`` the lean forward; how many were changed.

    ``autocast``: also stop peft's forward (still used by DoRA and the other cases above) from
    casting each LoRA input to the adapter's fp32: a copy of the whole activation, and one more
    in backward, that autocast undoes for the matmul; the same numbers without it.
    ``group``: sibling projections that read the same input (``GROUPS``) train as one
    :class:`SharedInput` node when all of them carry a plain adapter.
    """
    from peft.tuners.lora.layer import Linear

    classes: tuple[type, ...] = (Linear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        classes += (Linear4bit,)
    except ImportError:  # bitsandbytes absent: no QLoRA layers either
        pass
    changed = 0
    for module in model.modules():
        if autocast and hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
        if type(module) in classes:
            module.forward = types.MethodType(
                lambda self, x, *a, _f=module.forward, **k: _lean_forward(self, x, *a, _peft_forward=_f, **k), module)
            changed += 1
    if group:
        for module in model.modules():
            for names in GROUPS:
                layers = [getattr(module, n, None) for n in names]
                if all(type(m) in classes for m in layers) and len({m.in_features for m in layers}) == 1:
                    shared = _Group(layers)
                    for m in layers:
                        m.__dict__["_lora_group"] = shared
    return changed
