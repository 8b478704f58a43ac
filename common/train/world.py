"""Which process of a data-parallel job this is, read from the launcher's environment.

Framework-free: ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT,
read by torch.distributed itself); ``mlx.launch`` sets MLX_RANK and its hostfile variables, read
by mx.distributed.init(). The collectives themselves belong to the backend (``init_world``,
``all_sum``, and the gradient all-reduce inside ``optimizer_step``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import UserError

INIT_TIMEOUT_S = 120  # a rank that cannot reach the others fails within this, never hangs
TIMEOUT_ENV = "LLM_FT_INIT_TIMEOUT_S"  # overrides it (a slow cluster's start; a test's short one)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str | None = None  # "torchrun", "mlx.launch", None for a single process
    local_size: int | None = None  # processes on this machine (torchrun's LOCAL_WORLD_SIZE); None: unknown

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size != 1  # 0: launched by mlx.launch, size known once the backend joins


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def from_env(env: Mapping[str, str] | None = None) -> World:
    """This process's place in the job, from torchrun's or mlx.launch's variables; one process if neither."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        world = World(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env
                      else 0, "torchrun", _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None)
    elif "MLX_RANK" in env:
        # mlx.launch does not export the size: mx.distributed.init() tells the backend
        world = World(_int(env, "MLX_RANK"), _int(env, "MLX_WORLD_SIZE") if "MLX_WORLD_SIZE" in env else 0,
                      0, "mlx.launch")
    else:
        return World()
    if world.size and not 0 <= world.rank < world.size:
        raise UserError(f"rank {world.rank} is outside a world of {world.size} processes")
    return world


def config_digest(values: dict[str, Any]) -> list[float]:
    """The resolved config as 4 numbers below 2**24 (exact in float32 sums), for ranks to compare
    with an all_sum: every rank's digest equals the sum / size only when all agree."""
    h = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).digest()
    return [float(int.from_bytes(h[i:i + 3], "big")) for i in range(0, 12, 3)]


def init_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds a rank waits to join the others: $LLM_FT_INIT_TIMEOUT_S, else INIT_TIMEOUT_S."""
    env = os.environ if env is None else env
    if TIMEOUT_ENV not in env:
        return float(INIT_TIMEOUT_S)
    try:
        value = float(env[TIMEOUT_ENV])
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise UserError(f"environment variable {TIMEOUT_ENV}={env[TIMEOUT_ENV]!r}: expected seconds, above 0 "
                        "and below 86400")
    return value
