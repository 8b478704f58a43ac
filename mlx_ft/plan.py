"""The MLX backend's device plan: where it will train and what that costs, before mlx loads a weight.

:func:`device_plan` is the registry's ``plan`` entry (common.backends). It mirrors
``mlx_ft.model.select_device`` and ``resolve_dtype``: fp32 on the CPU, bf16 on a GPU.
"""

from __future__ import annotations

import sys

from common.backends import DevicePlan, is_apple_silicon

MiB = 1 << 20
OVERHEAD = 300 * MiB  # the MLX runtime before any model
SLACK = 1.2  # resident peak / saved tensors, for activations and logits
Q4_BYTES = 0.5 + 4 / 64  # 4-bit + fp16 scale and bias per group of 64 (mlx_ft.model.QUANT_GROUP)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _on_gpu(device: str | None) -> bool:
    if device is not None:
        return device.split(":")[0].lower() != "cpu"
    try:
        import mlx.core as mx
    except ImportError:  # loading the backend will say what to install
        return is_apple_silicon()
    return mx.default_device().type == mx.gpu


def device_plan(device: str | None, dtype: str = "auto") -> DevicePlan:
    """``--device`` (None: MLX's default, the GPU when present) and its costs."""
    gpu = _on_gpu(device)
    dtype_bytes = DTYPE_BYTES[dtype] if dtype != "auto" else 2 if gpu else 4
    return DevicePlan(backend="mlx", device=device or ("gpu" if gpu else "cpu"), dtype_bytes=dtype_bytes,
                      overhead_bytes=OVERHEAD, slack=SLACK, quant_bytes=Q4_BYTES, quantizes_embeddings=True,
                      can_quantize=True, unified_memory=sys.platform == "darwin")
