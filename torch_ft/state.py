"""Optimizer, loss-scaler and RNG state as safetensors + JSON (never pickle).

``optimizer.safetensors`` holds every tensor of ``optimizer.state_dict()['state']`` under
``state.<param index>.<key>`` (``<outer>/<inner>`` for nested dicts: bitsandbytes wraps its
quantisation state in one); ``optimizer.json`` holds everything else in the same shape, the
param groups and the gradient scaler; ``rng.safetensors`` holds torch's generator states as uint8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"


def _plain(value: Any) -> Any:
    """JSON-safe copy of a param-group value (tuples become lists, 0-d tensors numbers)."""
    if torch.is_tensor(value):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _split(entry: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move the tensors of a (nested) state entry into ``tensors``; return the rest."""
    rest: dict[str, Any] = {}
    for key, value in entry.items():
        if torch.is_tensor(value):
            tensors[f"{prefix}{key}"] = value.detach().to("cpu").contiguous()
        elif isinstance(value, dict):
            rest[key] = _split(value, f"{prefix}{key}/", tensors)
        else:
            rest[key] = _plain(value)
    return rest


def save_optimizer(optimizer, scaler, out_dir: Path) -> list[str]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars = {str(idx): _split(entry, f"state.{idx}.", tensors) for idx, entry in sd["state"].items()}
    groups = [{k: _plain(v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars,
            "tensor_params": sorted({int(k.split(".")[1]) for k in tensors}),
            "scaler": scaler.state_dict() if scaler is not None else None}
    save_file(tensors, str(out_dir / OPTIMIZER_TENSORS), metadata={"format": "pt"})
    (out_dir / OPTIMIZER_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return [OPTIMIZER_TENSORS, OPTIMIZER_JSON]


def load_optimizer(optimizer, scaler, in_dir: Path, allow_partial: bool) -> bool:
    """Restore optimizer (and scaler) state; False when absent and ``allow_partial``."""
    tfile, jfile = in_dir / OPTIMIZER_TENSORS, in_dir / OPTIMIZER_JSON
    if not (tfile.exists() and jfile.exists()):
        if allow_partial:
            return False
        missing = [str(f) for f in (tfile, jfile) if not f.exists()]
        raise UserError(f"{in_dir}: checkpoint has no optimizer state; resuming would change the run "
                        "(pass --allow-partial-resume to continue with a fresh optimizer)", missing)
    meta = json.loads(jfile.read_text(encoding="utf-8"))
    if meta.get("class") != type(optimizer).__name__:
        raise UserError(f"{jfile}: optimizer state is for {meta.get('class')}, this run uses "
                        f"{type(optimizer).__name__} (--optim changed?)")
    state: dict[int, dict[str, Any]] = {int(idx): entry for idx, entry in meta["scalars"].items()}
    for key, value in load_file(str(tfile)).items():
        _, idx, path = key.split(".", 2)
        node = state.setdefault(int(idx), {})
        *outer, name = path.split("/")
        for part in outer:
            node = node.setdefault(part, {})
        node[name] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{in_dir}: optimizer state does not fit this adapter: {exc}") from None
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return True


def save_rng(out_dir: Path) -> list[str]:
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = s.cpu()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        tensors["torch.mps"] = torch.mps.get_rng_state()
    save_file(tensors, str(out_dir / RNG_FILE))
    return [RNG_FILE]


def load_rng(in_dir: Path) -> bool:
    f = in_dir / RNG_FILE
    if not f.exists():
        return False
    tensors = load_file(str(f))
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if "torch.mps" in tensors and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(tensors["torch.mps"])
    return True
