"""Offloaded activation checkpointing: each decoder layer recomputed in backward, its input kept in CPU memory.

Plain checkpointing (``--memory-mode checkpoint``) keeps one tensor per layer on the GPU, the
layer's input (tokens x hidden at the compute dtype: 32 MiB per layer for 4096 tokens of an 8B
model, 1 GiB over its 32 layers), and recomputes the layer's attention, MLP and LoRA
intermediates in backward instead of storing them. ``--memory-mode offload`` moves those inputs
to pinned host memory as well, as Unsloth's ``use_gradient_checkpointing="unsloth"`` does:

- forward: the layer runs under torch's reentrant checkpoint, which saves only its inputs with
  ``save_for_backward``; a ``saved_tensors_hooks`` pack hook copies each of them to a pinned
  CPU buffer on a side CUDA stream, ``non_blocking``, so the copy overlaps the next layers'
  compute (``record_stream`` keeps the GPU tensor alive until the copy has run);
- backward: the unpack hook makes the compute stream wait for that copy's event and copies the
  tensor back (``non_blocking`` from pinned memory), then the layer is recomputed.

On a CPU device there is nowhere to offload to: the pack hook keeps the tensor as it is, so the
hooks and the recompute run (tests check the losses) but memory is that of plain checkpointing.
Reentrant checkpointing gives gradients only to layers whose input requires grad; with a frozen
embedding nothing does, so :func:`enable` makes the embedding output require grad (as
transformers' ``enable_input_require_grads`` does).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint


class HostOffload:
    """``saved_tensors_hooks`` pack/unpack pair moving saved CUDA tensors to pinned CPU memory asynchronously."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.packed = 0  # tensors saved through these hooks since creation (on any device)
        self.offloaded_bytes = 0  # of which bytes copied to the host

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, tensor: torch.Tensor):
        self.packed += 1
        if tensor.device.type != "cuda":
            return tensor  # CPU run: nothing to offload to; keep it as plain checkpointing would
        side = self._stream(tensor.device)
        host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written by compute first
        with torch.cuda.stream(side):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        tensor.record_stream(side)  # its GPU memory is not reused before the copy has read it
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return tensor.device, host, done

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)  # pinned source: torch keeps it alive until the copy ran


def offloaded_checkpoint(hooks: HostOffload, function, *args):
    """``checkpoint(function, *args)`` whose saved inputs go through ``hooks`` (a layer's drop-in
    ``_gradient_checkpointing_func``; transformers binds the keyword arguments into ``function``)."""
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        return checkpoint(function, *args, use_reentrant=True)


def _require_input_grads(_module, _inputs, output):
    output.requires_grad_(True)


def enable(model) -> tuple[HostOffload, int]:
    """Checkpoint every decoder layer of ``model`` (a transformers causal LM) with host offload of its input.

    Returns the hooks (their ``offloaded_bytes`` counts what moved) and the number of layers.
    """
    layers = [m for m in getattr(model.get_decoder(), "layers", []) if hasattr(m, "gradient_checkpointing")]
    if not layers:
        from common.errors import UserError

        raise UserError(f"--memory-mode offload: {type(model).__name__} has no checkpointable decoder layers",
                        ["use --memory-mode checkpoint or default"])
    hooks = HostOffload()
    fn = partial(offloaded_checkpoint, hooks)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = fn  # called by transformers' GradientCheckpointingLayer in training
    model.get_input_embeddings().register_forward_hook(_require_input_grads)
    return hooks, len(layers)
