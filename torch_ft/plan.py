"""The torch backend's device plan: where it will train and what that costs, before torch loads a weight.

:func:`device_plan` is the registry's ``plan`` entry (common.backends); it imports torch only to
find the best device or measure a GPU's free memory. The CPU tuning constants live here too: the
plan hands them to the memory preflight, and :class:`torch_ft.backend.TorchBackend` runs by them.
"""

from __future__ import annotations

import sys

from common.backends import DevicePlan
from common.models.memory import format_bytes

MiB = 1 << 20
# On the CPU the torch backend runs a batch's forward and backward in groups of rows of at
# most this many positions (one row when rows are longer): gradients add up, so the step is
# the same, and activation memory is that of one group. Measured with SmolLM2-135M on data/
# (rows of ~100 tokens, batch 4, 2 cores; bench/RESULTS.md): 256 (two rows a pass) runs at
# 0.91-0.96x the speed of whole batches for ~0.83x the peak RSS; 128 (one row) at 0.71x for 0.65x.
CPU_TOKENS_PER_PASS = 256
# ... and recomputes every CPU_RECOMPUTE_EVERY-th transformer layer in backward instead of keeping its
# activations (gradient checkpointing on 1 layer in 6; on all of them with --grad-checkpoint). Same
# model and data, 2 cores (bench/RESULTS.md): 1.61 GiB peak RSS instead of 1.68 for 0.82x the speed;
# 1 layer in 3 gave 1.55 GiB at 0.75x.
CPU_RECOMPUTE_EVERY = 6
# Runtime footprint before any model: torch + transformers + peft imported is 396 MiB RSS on
# Linux CPU; a CUDA context and cuBLAS workspace take about 600 MiB of the GPU.
OVERHEAD = {"cpu": 400 * MiB, "cuda": 600 * MiB, "mps": 400 * MiB}
# Resident peak / saved tensors, for activations and logits. On Linux CPU glibc keeps the heap
# pages of freed temporaries, which nearly doubles the resident peak (measured: x1.9).
SLACK = {"cpu": 1.9, "cuda": 1.15, "mps": 1.2}
# fp32 logits per loss chunk (torch_ft.loss): 32M values = 128 MB (261 positions of a 128k vocabulary). A chunk's
# logits, log-softmax and their gradients are alive together at the step's peak, on top of every stored
# activation. Llama-3.1-8B's head, 2048 positions, H100 (bench/gpu_loss_chunk.py): 2**26 adds 800 MiB
# at 17.5 ms, 2**25 415 MiB at 18.9 ms, 2**24 223 MiB at 28.6 ms (the matmul slows below ~256 rows).
LOGITS_BUDGET = 2**25
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # bitsandbytes: 4-bit + 8-bit absmax per 64 + fp32 per 256 absmax
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def rows_per_pass(rows: int, width: int, device_kind: str) -> int:
    """How many rows of ``width`` positions the torch backend runs per forward/backward."""
    if device_kind != "cpu" or rows * width <= CPU_TOKENS_PER_PASS:
        return rows
    return max(1, CPU_TOKENS_PER_PASS // max(1, width))


def _best_device() -> str:
    try:
        from torch_ft.device import best_device
    except ImportError:  # torch is absent: loading the backend will say what to install
        return "cpu"
    return best_device()


def _cuda_memory(device: str) -> tuple[int, str]:
    try:
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
    except (ImportError, RuntimeError, AssertionError, ValueError) as exc:  # no CUDA here: unknown never blocks
        return 0, f"{device}: free memory unknown ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return int(free), f"{name}: {format_bytes(free)} free of {format_bytes(total)}"


def device_plan(device: str | None, dtype: str = "auto") -> DevicePlan:
    """The device ``--device`` names (the best available when None) and its costs (see torch_ft.device.choose)."""
    device = device or _best_device()
    kind = device.split(":")[0]
    key = kind if kind in OVERHEAD else "cpu"
    dtype_bytes = DTYPE_BYTES[dtype] if dtype != "auto" else 2 if kind == "cuda" else 4
    return DevicePlan(backend="torch", device=device, dtype_bytes=dtype_bytes, overhead_bytes=OVERHEAD[key],
                      slack=SLACK[key], quant_bytes=NF4_BYTES, quantizes_embeddings=False,
                      can_quantize=kind == "cuda",  # bitsandbytes needs CUDA
                      device_memory=_cuda_memory(device) if kind == "cuda" else None,
                      unified_memory=sys.platform == "darwin" and kind in ("mps", "cpu"),
                      tokens_per_pass=CPU_TOKENS_PER_PASS if kind == "cpu" else None,
                      loss_chunk_values=LOGITS_BUDGET,
                      lean_layers=True)  # torch_ft.lean_mlp, torch_ft.norm_recompute
