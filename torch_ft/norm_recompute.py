"""Normalised layer inputs recomputed in backward instead of stored.

Each decoder layer normalises its residual stream twice (before attention, before the MLP)
and feeds the result to the LoRA projections, whose ``lora_A`` keeps it for its weight
gradient. The norm keeps its own input (the residual stream) for its backward anyway, so
the normalised copy is redundant: 2 x hidden values per token per layer, 2 GiB of a
4096-token step on a Llama-3.1-8B shape. :class:`NormRecompute` hands autograd a recipe
instead: a ``saved_tensors_hooks`` pack hook recognises a tensor saved from a norm's output
(same storage, recorded by a forward hook on the norm) and keeps the norm and its input; the
unpack hook runs the norm again (one elementwise kernel, once per norm output however many
projections saved it) and returns the same view. Anything else is saved as usual.

Only in training forwards (grad enabled) of the default memory mode; checkpointed layers
recompute everything already. The values are the same (the same kernel on the same input):
tests/test_lean_mlp.py compares losses and gradients with the unpatched model.
"""

from __future__ import annotations

import torch

# the two norms of a decoder layer whose outputs go straight into LoRA projections
INPUT_NORMS = ("input_layernorm", "post_attention_layernorm")


class _Recipe:
    __slots__ = ("norm", "source", "value")

    def __init__(self, norm: torch.nn.Module, source: torch.Tensor) -> None:
        self.norm, self.source, self.value = norm, source, None

    def recompute(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.norm(self.source)
        return self.value


class NormRecompute:
    """The hooks; :func:`install` wires them into a causal LM."""

    def __init__(self) -> None:
        # storage pointer -> (norm output, its version, recipe), for the layer running now
        self._live: dict[int, tuple[torch.Tensor, int, _Recipe]] = {}
        self._context = None
        self.recipes = 0  # saved tensors replaced by a recipe since creation

    # forward hooks
    def norm_done(self, module, inputs, output) -> None:
        if self._context is not None and isinstance(output, torch.Tensor):
            self._live[output.untyped_storage().data_ptr()] = (output, output._version, _Recipe(module, inputs[0]))

    def layer_done(self, *_args) -> None:
        self._live.clear()  # the norm outputs may be freed now; a later tensor may reuse their memory

    def enter(self, *_args) -> None:
        if torch.is_grad_enabled() and self._context is None:
            self._context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._context.__enter__()

    def leave(self, *_args) -> None:
        if self._context is not None:
            self._live.clear()
            self._context.__exit__(None, None, None)
            self._context = None

    # saved-tensor hooks
    def pack(self, tensor: torch.Tensor):
        if tensor.device.type != "meta" and self._live:
            hit = self._live.get(tensor.untyped_storage().data_ptr())
            # the norm's output or a view of it, not changed in place since the norm wrote it
            if hit is not None and hit[0].dtype == tensor.dtype and tensor._version == hit[1]:
                self.recipes += 1
                return hit[2], tensor.shape, tensor.stride(), tensor.storage_offset()
        return tensor

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        recipe, shape, stride, offset = packed
        return recipe.recompute().as_strided(shape, stride, offset)


def install(causal_lm) -> NormRecompute | None:
    """Hook the decoder of ``causal_lm`` (a transformers CausalLM); None when it has no such norms."""
    decoder = causal_lm.get_decoder()
    layers = list(getattr(decoder, "layers", []))
    norms = [getattr(layer, name) for layer in layers for name in INPUT_NORMS if hasattr(layer, name)]
    if not norms:
        return None
    hooks = NormRecompute()
    for norm in norms:
        norm.register_forward_hook(hooks.norm_done)
    for layer in layers:
        layer.register_forward_hook(hooks.layer_done)
    decoder.register_forward_pre_hook(hooks.enter)
    decoder.register_forward_hook(hooks.leave, always_call=True)  # also when the forward raises
    return hooks
