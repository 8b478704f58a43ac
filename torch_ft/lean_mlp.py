"""The gated MLP's activation product recomputed in backward instead of stored.

A Llama-style MLP computes ``down(act(gate(x)) * up(x))``. With a LoRA on ``down_proj``,
autograd keeps the product ``h = act(gate) * up`` (tokens x intermediate) for the adapter's
gradient, next to ``gate`` and ``up`` that the activation's backward keeps anyway: on a
Llama-3.1-8B shape that is 14,336 of the ~70,000 values each token stores in each layer,
3.5 GiB of a 4096-token step. :class:`GatedDown` takes ``gate`` and ``up`` and runs the
product and the LoRA ``down_proj`` in one autograd node that keeps only ``gate``, ``up`` and
the rank-r ``s h A^T``; backward recomputes ``h`` (elementwise: a few per cent of the layer's
time) and applies the frozen base and the adapter by hand. Unsloth's LoRA MLP does the
same; here it is the module's own ``act_fn``, differentiated by autograd on the recomputed
values, so any gated activation (SiLU, GELU-tanh) takes the path.

Only the plain case takes it (a peft LoRA ``down_proj`` with one active adapter, no
dropout, DoRA or other variant, over a ``nn.Linear`` or bitsandbytes 4-bit base, outside
FSDP); anything else keeps the module's own forward. The numbers are the same function:
tests/test_lean_mlp.py compares losses and gradients with the unpatched model.
"""

from __future__ import annotations

import types

import torch

from torch_ft.lora_forward import dense_weight, plain_adapter

# transformers MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP",
                        "GraniteMLP", "SmolLM3MLP", "OlmoMLP", "Olmo2MLP"})


class GatedDown(torch.autograd.Function):
    """``base(h) + s * (h A^T) B^T`` with ``h = act(gate) * up``, keeping gate, up and h A^T only."""

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, scaling: float, base: torch.nn.Module, act, liger: bool):
        liger = liger and gate.is_cuda and gate.is_contiguous() and up.is_contiguous()
        h = _liger_swiglu().swiglu_forward(gate, up)[2] if liger else act(gate) * up
        low = (h @ lora_a.to(h.dtype).t()) * scaling  # (tokens, r): scaled here, as lora_forward does
        result = base(h)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                          lora_b.to(h.dtype).t()).view(result.shape)
        ctx.save_for_backward(gate, up, low, lora_a, lora_b)
        ctx.scaling, ctx.base, ctx.act, ctx.liger = scaling, base, act, liger
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, low, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        needs_x = gate.requires_grad or up.requires_grad
        if ctx.liger:  # one Triton kernel each way; its backward writes d gate and d up over gate and up
            h = _liger_swiglu().swiglu_forward(gate, up)[2]
        else:
            with torch.enable_grad():
                g = gate.detach().requires_grad_(gate.requires_grad)
                u = up.detach().requires_grad_(up.requires_grad)
                h = ctx.act(g) * u
        dt = h.dtype
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
        flat_h = h.detach().reshape(-1, h.shape[-1])
        a, b = lora_a.to(dt), lora_b.to(dt)
        d_low = (dy @ b) * s  # (tokens, r)
        grad_a = (d_low.t() @ flat_h).to(lora_a.dtype) if lora_a.requires_grad else None
        grad_b = (dy.t() @ low.reshape(-1, low.shape[-1])).to(lora_b.dtype) if lora_b.requires_grad else None
        if not needs_x:
            return None, None, grad_a, grad_b, None, None, None, None
        del flat_h
        dh = (dy @ dense_weight(ctx.base, dt)).addmm_(d_low, a).view(h.shape)
        if ctx.liger:
            del h
            grad_g, grad_u = _liger_swiglu().swiglu_backward(gate, up, dh)
        else:
            wanted = [t for t in (g, u) if t.requires_grad]
            grads = iter(torch.autograd.grad(h, wanted, dh))
            grad_g = next(grads) if g.requires_grad else None
            grad_u = next(grads) if u.requires_grad else None
        return (grad_g if gate.requires_grad else None, grad_u if up.requires_grad else None, grad_a, grad_b,
                None, None, None, None)


def _liger_swiglu():
    from liger_kernel.ops import swiglu

    return swiglu


def _lean_forward(self, x, *, _forward, _liger):
    down = self.down_proj
    name = plain_adapter(down)
    if name is None:
        return _forward(x)
    return GatedDown.apply(self.gate_proj(x), self.up_proj(x), down.lora_A[name].weight, down.lora_B[name].weight,
                           down.scaling[name], down.base_layer, self.act_fn, _liger)


def install(model, liger: bool = False) -> int:
    """Give every gated MLP of ``model`` (after peft) whose ``down_proj`` carries a LoRA the lean forward.

    ``liger``: the SiLU product and its backward run as Liger's Triton kernels on CUDA tensors
    (as Liger's own SwiGLU MLP does); otherwise as torch ops differentiated by autograd.
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLPS and plain_adapter(getattr(module, "down_proj", None)) is not None:
            fused = liger and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            module.forward = types.MethodType(
                lambda self, x, _f=module.forward, _l=fused: _lean_forward(self, x, _forward=_f, _liger=_l), module)
            changed += 1
    return changed
