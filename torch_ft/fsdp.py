"""``--fsdp``: shard the frozen base over the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

For a base that does not fit one GPU. As torchtune, Axolotl and accelerate do, each decoder layer
is one FSDP unit (its weights are all-gathered just before its forward and backward and freed after)
and the root takes the rest (embeddings, final norm, head). What differs: the LoRA weights are
``ignored_params`` of FSDP, whole on every rank. They are a few MB to a few hundred MB, so sharding
them saves little, and keeping them plain means everything that touches them is the data-parallel
path already tested: the gradient all-reduce before clipping (``torch_ft.dist``), the global
non-finite check, the optimizer state, checkpoints (the same files at any world size, with or without
``--fsdp``) and rank 0 writing the adapter with no gather. Only the frozen base is a DTensor.

Every rank must make the same sequence of forward calls (each all-gathers), so the backend reports
``lockstep``: the loop pads evaluation to the same number of batches per rank and every rank runs
the sample generations (rank 0 alone prints them).

QLoRA: the 4-bit base is stored in bf16-typed containers (``bnb_4bit_quant_storage``) so that FSDP
can shard it like any bf16 tensor; that path needs CUDA GPUs and is not exercised by our CPU tests.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from common.errors import UserError
from common.options import TrainConfig, memory_mode
from common.train.world import World


def check(cfg: TrainConfig, world: World) -> None:
    """Refuse what --fsdp cannot do, before anything is loaded."""
    if not world.distributed:
        raise UserError("--fsdp shards the base model over the processes of a data-parallel job, and this is one "
                        "process", ["add --nproc N (N processes on this machine), or start it with torchrun"])
    if cfg.load_in_8bit:
        raise UserError("--fsdp with --load-in-8bit: bitsandbytes' int8 base cannot be sharded",
                        ["use --load-in-4bit (QLoRA, sharded with a bf16 quant storage) or a bf16 base"])
    if cfg.method != "sft":
        raise UserError(f"--fsdp with --method {cfg.method}: not supported yet (the reference model's passes are "
                        "not made in step on every rank)", ["drop --fsdp: plain data parallelism trains it"])
    if memory_mode(cfg) == "offload":
        raise UserError("--fsdp with --memory-mode offload: not supported yet (the offload hooks and FSDP's "
                        "gathers of a layer are not ordered together)", ["use --memory-mode checkpoint with --fsdp"])
    if cfg.compile == "on":
        raise UserError("--fsdp with --compile on: not supported yet", ["use --compile off"])


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers causal LM (peft wrapper removed)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not layers:
        raise UserError(f"--fsdp: cannot find the decoder layers of {type(model).__name__}")
    return list(layers)


def shard(peft_model, world: World, device_kind: str) -> str:
    """Shard the base of ``peft_model`` in place: each decoder layer, then the root. A note for the log."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device_kind == "cuda" else "cpu", (world.size,))
    lora = {p for p in peft_model.parameters() if p.requires_grad}
    base = peft_model.get_base_model()
    layers = decoder_layers(base)
    for layer in layers:
        # reshard after forward: the layer is gathered again for backward (memory over speed, as torchtune's default)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, ignored_params=lora & set(layer.parameters()))
    fully_shard(base, mesh=mesh, reshard_after_forward=True, ignored_params=lora)
    frozen = sum(p.numel() for p in base.parameters() if not p.requires_grad)
    return (f"FSDP2: the frozen base ({frozen:,} parameters) sharded over {world.size} ranks, {len(layers)} decoder "
            f"layers + root; LoRA weights whole on each rank")



def as_root_forward(causal_lm, fn: Callable) -> Callable:
    """``fn(causal_lm, ...)`` run as a forward of the FSDP root: our loss calls the decoder and the head
    itself (not ``causal_lm.forward``), and the root's hooks must gather the embeddings and head around
    it (and, the first time, set the job up) as they do around a forward."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    causal_lm.llm_ft_loss = types.MethodType(lambda self, *args: fn(self, *args), causal_lm)
    register_fsdp_forward_method(causal_lm, "llm_ft_loss")
    return causal_lm.llm_ft_loss
