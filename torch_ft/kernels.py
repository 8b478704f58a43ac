"""Fused kernels for the torch backend on NVIDIA GPUs: torch's own fused RMSNorm, or Liger's
Triton kernels (RMSNorm, SwiGLU, RoPE) where installed.

Each replaces several memory-bound elementwise passes of the transformers module with one
kernel, forward and backward; the matmuls (and the LoRA layers peft puts around them) are
untouched. Liger's fused-linear cross-entropy is not used: our loss already runs lm_head only
on supervised positions, in chunks (torch_ft.loss).

"auto" applies them to models of hidden size >= ``LIGER_MIN_HIDDEN`` only: on an H100 with
packed 4096-token rows (bench/RESULTS.md) they bought 1.23x tokens/s on a Llama-3.1-8B shape
(hidden 4096) but cost 0.84x on a Llama-3.2-1B shape (hidden 2048), where the unfused ops
are cheap and the extra kernel launches are not.

Below that size "auto" uses torch's own fused RMSNorm (``torch.nn.functional.rms_norm``: one
kernel forward and one backward on CUDA, against transformers' eight and about a dozen):
a 1B LoRA step is bound by launching kernels, not by the GPU.
"""

from __future__ import annotations

import importlib.util
import logging

from common.errors import UserError
from torch_ft.device import Precision

LIGER_MIN_HIDDEN = 4096
# transformers RMSNorm classes whose forward is LlamaRMSNorm's: ``weight * normalize(x in fp32).to(x.dtype)``
# (Gemma's ``1 + weight`` and OLMo 2's weight-before-cast differ, and keep their own forward).
LLAMA_RMSNORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
                            "GraniteRMSNorm", "SmolLM3RMSNorm"})


def liger_usable(prec: Precision) -> bool:
    return prec.kind == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def _fused_rms_norm(self, hidden_states):
    """LlamaRMSNorm's forward as torch's fused op (fp32 inside, one rounding to the input dtype)."""
    import torch.nn.functional as F

    if hidden_states.dtype != self.weight.dtype:  # e.g. fp32 norms on bf16 activations: promote as before
        return type(self).forward(self, hidden_states)
    out = F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
    return out.to(hidden_states.dtype)  # autocast may run it in fp32


def fuse_rms_norms(model) -> int:
    """Give every Llama-style RMSNorm of ``model`` the fused forward; how many were changed."""
    import types

    n = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_RMSNORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_rms_norm, module)
            n += 1
    return n


def _native(model) -> str | None:
    n = fuse_rms_norms(model)
    return f"torch's fused RMSNorm ({n} norms)" if n else None


def apply(model, prec: Precision, choice: str = "auto") -> str | None:
    """Patch ``model`` (a transformers CausalLM, before peft) with fused kernels; a note, or None."""
    if choice == "off" or (choice == "auto" and prec.kind != "cuda"):
        return None  # on the CPU the fused op is the same composite of ops (--kernels native applies it anyway)
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    if choice == "native" or (choice == "auto" and (not liger_usable(prec) or hidden < LIGER_MIN_HIDDEN)):
        return _native(model)
    if not liger_usable(prec):
        raise UserError(f"--kernels liger: needs an NVIDIA GPU and liger-kernel (this run: {prec.device})",
                        ["pip install 'llm-ft[cuda]'", "or --kernels auto"])
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if choice == "liger":
            raise UserError(f"--kernels liger: Liger has no kernels for model type {model_type!r}")
        return _native(model)
    logging.getLogger("liger_kernel").setLevel(logging.WARNING)
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return f"Liger kernels ({model_type}): RMSNorm, SwiGLU, RoPE"


def compile_layers(model, prec: Precision, choice: str = "off") -> str | None:
    """``torch.compile`` every transformer layer of ``model`` (peft's LoRA layers inside); a note, or None.

    Regional compilation: the layers share one compiled graph (compiled once, not per layer),
    with dynamic shapes, since every flattened batch has its own length.
    """
    if choice == "off" or (choice == "auto" and prec.kind != "cuda"):
        return None
    if prec.kind != "cuda":
        raise UserError(f"--compile on: needs an NVIDIA GPU (this run: {prec.device})", ["or --compile off"])
    import torch

    layers = getattr(model.get_base_model().get_decoder(), "layers", None)
    if layers is None:
        raise UserError("--compile on: this model has no decoder layers list to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return f"torch.compile: {len(layers)} decoder layers, dynamic shapes (torch {torch.__version__})"
