"""The memory preflight per process of a data-parallel job (``--nproc``, torchrun, mlx.launch).

Plain data parallelism: every process holds the whole base, its LoRA copy, its optimizer and
its own activations, so one process needs what a single run does. ``--fsdp`` (torch): each
process holds 1/N of the decoder layers' weights; the weights outside them (embeddings, final
norm, head: FSDP's root unit) are gathered whole for the whole forward and backward, and up to
two decoder layers are gathered at once (the one computing and the next one being fetched).

Where the processes share one memory (the CPU's RAM, a Mac's unified memory) they divide it:
each may use 1/k of what is available, k the processes on this machine. A discrete GPU is one
process's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.backends import DevicePlan

GATHERED_LAYERS = 2  # the layer computing plus the next one prefetched


@dataclass(frozen=True)
class RankLayout:
    processes: int = 1  # processes of the job (the world size)
    fsdp: bool = False  # the base is sharded over them (torch --fsdp)
    local: int | None = None  # processes on this machine (default: all of them)

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.processes > 1

    def sharing(self, plan: DevicePlan) -> int:
        """How many processes divide the memory ``plan`` measures (1 for a discrete GPU each)."""
        discrete = plan.device_memory is not None or (plan.device or "").startswith("cuda")
        return 1 if discrete else max(1, self.local or self.processes)

    def describe(self) -> str:
        if self.processes <= 1:
            return ""
        how = "FSDP: 1/N of the base each" if self.sharded else "the whole base each"
        return f"per process of {self.processes} ({how})"


def weights_per_rank(weights: int, root_bytes: int, layers: int, layout: RankLayout) -> int:
    """Bytes of base weights one process holds at its peak; ``root_bytes`` are those outside the
    decoder layers (embeddings, final norm, head), included in ``weights``."""
    if not layout.sharded:
        return weights
    in_layers = max(0, weights - root_bytes)
    layer = in_layers / max(1, layers)
    shard = in_layers / layout.processes
    return int(shard + root_bytes + min(GATHERED_LAYERS, layers) * layer * (layout.processes - 1) / layout.processes)


def apply(parts: dict[str, int], *, weights_root: int, layers: int, layout: RankLayout | None) -> dict[str, int]:
    """The single-process estimate's parts as one process of ``layout`` needs them."""
    if layout is None or not layout.sharded:
        return parts
    return {**parts, "weights": weights_per_rank(parts["weights"], weights_root, layers, layout)}
