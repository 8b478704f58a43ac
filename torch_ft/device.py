"""Device and precision for the hardware at hand.

CUDA: bf16 autocast where the GPU has native bf16 (compute capability >= 8.0, Ampere+),
else fp16 autocast with a gradient scaler. ROCm GPUs appear as ``cuda`` in torch
(``torch.version.hip`` is set); bf16 where ``torch.cuda.is_bf16_supported()``. Apple MPS
and CPU train in fp32 (MPS half precision is not reliable for training; CPU has no fast
half matmuls). LoRA weights stay fp32 everywhere; only the frozen base is half.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Precision:
    device: torch.device
    kind: str  # "cuda" | "rocm" | "mps" | "cpu"
    dtype: torch.dtype  # the frozen base weights' dtype and the autocast dtype
    autocast: bool  # run forward passes under torch.autocast(dtype)
    grad_scaler: bool  # fp16 needs loss scaling to keep small gradients from flushing to zero
    description: str  # printed for the user

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _gpu_name(index: int) -> str:
    try:
        return torch.cuda.get_device_name(index)
    except Exception:  # pragma: no cover - a driver that cannot answer
        return "GPU"


def best_device() -> str:
    """The best available device: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose(device: str | None = None, dtype: str = "auto") -> Precision:
    """Pick the device (the best available unless ``device`` is given) and the precision."""
    if device is None:
        device = best_device()
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available in this torch build "
                            f"({torch.__version__}); use --device cpu or install a CUDA build of torch")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        dev = torch.device("cuda", index)
        rocm = torch.version.hip is not None
        if rocm:
            bf16_ok = torch.cuda.is_bf16_supported()
            where = f"{_gpu_name(index)} (ROCm {torch.version.hip})"
        else:
            cc = torch.cuda.get_device_capability(index)
            bf16_ok = cc >= (8, 0)  # Ampere and newer have bf16 tensor cores
            where = f"{_gpu_name(index)} (compute capability {cc[0]}.{cc[1]})"
        if dtype == "auto":
            dtype = "bfloat16" if bf16_ok else "float16"
        elif dtype == "bfloat16" and not bf16_ok:
            raise UserError(f"--dtype bfloat16: {where} has no native bf16; use --dtype float16 (or auto)")
        dt = DTYPES[dtype]
        half = dt != torch.float32
        return Precision(dev, "rocm" if rocm else "cuda", dt, autocast=half, grad_scaler=dt == torch.float16,
                         description=f"{dev} {where}, {dtype}" + (" autocast" if half else "") +
                         (" + gradient scaler" if dt == torch.float16 else "") + ", LoRA weights fp32")
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: MPS is not available (needs Apple Silicon and macOS 12.3+)")
        if dtype not in ("auto", "float32"):
            raise UserError(f"--dtype {dtype}: the torch backend trains in float32 on MPS; "
                            "for half precision on a Mac use --backend mlx")
        return Precision(dev, "mps", torch.float32, autocast=False, grad_scaler=False,
                         description="mps (Apple GPU), float32")
    if dev.type == "cpu":
        if dtype in ("float16",):
            raise UserError("--dtype float16: not supported on CPU; use float32 (default) or bfloat16")
        dt = DTYPES["float32" if dtype == "auto" else dtype]
        threads = cpu_threads()
        torch.set_num_threads(threads)
        return Precision(dev, "cpu", dt, autocast=dt != torch.float32, grad_scaler=False,
                         description=f"cpu ({threads} threads), {str(dt).removeprefix('torch.')}")
    raise UserError(f"--device {device}: unsupported device type {dev.type!r} (cuda, mps or cpu)")


def cpu_threads() -> int:
    """Threads for CPU math: OMP_NUM_THREADS if set, else every core this process may use."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cpu_note(threads: int) -> str | None:
    """A hint when other processes already load the cores: spinning math threads then slow down
    badly (measured: 6x slower with 2 threads at load 8 on 2 cores, vs 1 thread)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # Windows
        return None
    if threads > 1 and load > threads + 1:
        return (f"the CPU is busy (load {load:.1f} on {threads} cores): if steps are slow, "
                "try OMP_NUM_THREADS=1 (or fewer threads)")
    return None


def autocast(p: Precision):
    """The autocast context for forward passes (a no-op in fp32)."""
    import contextlib

    if not p.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type=p.device.type, dtype=p.dtype)


def reset_peak_memory(p: Precision) -> None:
    if p.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(p.device)


def peak_memory(p: Precision) -> int | None:
    """Peak bytes: device memory on CUDA/ROCm, current allocation on MPS, peak RSS on CPU."""
    if p.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(p.device))
    if p.device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
    except Exception:  # pragma: no cover - no resource module (Windows)
        return None
