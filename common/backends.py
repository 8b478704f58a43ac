"""The backend registry: which packages train and generate, and what they will run on.

A backend is one package (``torch_ft/``, ``mlx_ft/``) and one line of :data:`REGISTRY`.
The line names, as ``"module:attr"`` strings imported only when asked for, the three
things the rest of the project needs from a framework:

- ``trainer``: the class implementing :class:`common.train.backend.Backend`;
- ``engine``: the :class:`common.generation.Generator` subclass used by eval, chat and serve;
- ``plan``: a function ``(device, dtype) -> DevicePlan`` saying, before any weight is loaded,
  where training will run and what the memory preflight must count for it.

Nothing here imports a framework: ``common`` stays importable with none installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import UserError

BackendName = Literal["auto", "torch", "mlx"]  # the choices of every --backend of training and generation


@dataclass(frozen=True)
class Entry:
    """One backend: its framework's top-level module, its pip extra, and where its parts live."""

    framework: str  # the module whose presence means "installed"
    extra: str  # pip install 'llm-ft[EXTRA]'
    trainer: str
    engine: str
    plan: str


# fmt: off
REGISTRY: dict[str, Entry] = {  # name: Entry(framework, extra, trainer, engine, plan)
    "torch": Entry("torch", "torch", "torch_ft.backend:TorchBackend", "torch_ft.generate:TorchGenerator", "torch_ft.plan:device_plan"),  # noqa: E501
    "mlx": Entry("mlx", "mlx", "mlx_ft.backend:MLXBackend", "mlx_ft.generate:MLXGenerator", "mlx_ft.plan:device_plan"),
}
# fmt: on
DEFAULT = "torch"  # auto's choice off Apple Silicon


@dataclass(frozen=True)
class DevicePlan:
    """Where a backend will train and what that costs, decided before anything is loaded.

    Plain data: ``train`` prints and checks it, the memory preflight (common.models.memory)
    counts with it, and ``models info`` shows it.
    """

    backend: str
    device: str | None  # the device string ('cuda:0', 'cpu', 'mps', 'gpu'); None = the framework's default
    dtype_bytes: int  # bytes per frozen base weight at the compute dtype
    overhead_bytes: int  # the runtime's own footprint before any model (measured)
    slack: float  # resident peak / saved tensors, for activations and logits (temporaries, allocator caching)
    quant_bytes: float  # bytes per weight of a 4-bit base (with its scales)
    quantizes_embeddings: bool  # whether a 4-bit base also quantizes the embeddings
    can_quantize: bool  # whether --load-in-4bit works here (a suggestion the preflight may make)
    device_memory: tuple[int, str] | None = None  # (free bytes, description) of a discrete GPU; None = system RAM
    unified_memory: bool = False  # the GPU shares the system's memory (Apple Silicon)
    tokens_per_pass: int | None = None  # a batch runs in groups of rows of at most this many positions; None = whole
    loss_chunk_values: int | None = None  # fp32 logits the loss builds at a time (chunks of positions); None = whole batch
    lean_layers: bool = False  # the MLP's activation product (and, without checkpointing, the normalised layer
    # inputs) are recomputed in backward, not stored; where the run allows it (common.models.memory.lean_allowed)

    def rows_per_pass(self, rows: int, width: int) -> int:
        """How many rows of ``width`` positions run per forward/backward (CPU row grouping)."""
        if self.tokens_per_pass is None or rows * width <= self.tokens_per_pass:
            return rows
        return max(1, self.tokens_per_pass // max(1, width))


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def installed(name: str) -> bool:
    """Whether ``name``'s framework can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(REGISTRY[name].framework) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a module without a spec
        return False


def resolve(name: str, prefer: str | None = None) -> str:
    """The backend ``name`` stands for: itself, or for ``auto`` the first installed of ``prefer``
    (e.g. the backend a run was trained with), MLX on Apple Silicon, torch, any other; torch
    when none is installed (loading it then says what to install)."""
    if name != "auto":
        if name not in REGISTRY:
            raise UserError(f"unknown backend {name!r}: choose auto, {', '.join(REGISTRY)}")
        return name
    order = [prefer] if prefer in REGISTRY else []
    order += (["mlx"] if is_apple_silicon() else []) + [DEFAULT] + list(REGISTRY)
    return next((n for n in order if installed(n)), DEFAULT)


def _load(name: str, part: str) -> Any:
    name = resolve(name)
    entry = REGISTRY[name]
    module_name, attr = getattr(entry, part).split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        what = "backend" if part == "trainer" else "engine"
        raise UserError(f"the {name} {what} is not installed ({exc.name or exc}): "
                        f"pip install 'llm-ft[{entry.extra}]'") from None
    return getattr(module, attr)


def load_backend(name: str):
    """A fresh training backend (common.train.backend.Backend) for ``name``, imported lazily."""
    return _load(name, "trainer")()


def engine_class(name: str):
    """The Generator subclass of backend ``name`` (its ``load`` classmethod loads a target)."""
    return _load(name, "engine")


def device_plan(name: str, device: str | None = None, dtype: str = "auto") -> DevicePlan:
    """What backend ``name`` will train on for ``--device``/``--dtype``, before it loads anything."""
    return _load(name, "plan")(device, dtype)
