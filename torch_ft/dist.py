"""Data parallelism on torch.distributed: process group, scalar sums, the LoRA-gradient all-reduce.

DDP semantics without DDP's wrapper: the trainable (LoRA) gradients of every rank are summed
in one flat buffer per dtype before clipping. The loop already scales each micro-batch's loss
by 1/(supervised tokens of the global step), so the SUM is the global mean gradient.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from common.errors import UserError
from common.train.world import World, init_timeout_s


def init(world: World, device_kind: str, timeout_s: float | None = None) -> None:
    """Join the job's process group (env:// from torchrun's variables); a clear error, not a hang."""
    if dist.is_initialized():
        return
    timeout_s = init_timeout_s() if timeout_s is None else timeout_s
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(world.local_rank)
    try:
        with _quiet_native_log():
            dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError) as exc:  # DistStoreError is a RuntimeError
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise UserError(f"rank {world.rank}: cannot join the job's process group at {where} "
                        f"within {timeout_s:g} s: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                        ["check --master-addr / --master-port (a port already in use?), and that every node runs "
                         "the same command"]) from None


@contextlib.contextmanager
def _quiet_native_log():
    """c10d logs every failed connection attempt with a C++ stack trace on stderr (fd 2): keep them out of the
    user's terminal while joining; our one-line error says what failed (host, port, timeout, cause)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (exact for counts and the config digest)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every trainable gradient over ranks, one flat buffer per dtype (a missing grad counts as 0)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(reduced)


def close() -> None:
    """Leave the group once every rank is done: a rank that tore gloo down while rank 0 still wrote the
    final adapter and summary aborted ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))  # names a rank that never arrives
        else:
            dist.barrier()
    except Exception:  # a rank already failed: its launcher reports it; leaving must not hang or mask that
        pass
    dist.destroy_process_group()
