"""LoRA adapters in PEFT's format, read and written without torch or mlx.

PEFT's layout is the one every part of llm-ft reads (merge, export, eval) and the one
both backends write: ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r)
and, for DoRA, ``...lora_magnitude_vector`` (out,), beside ``adapter_config.json``
(``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
``use_dora``, ...). The update of a module is ``W x + scale * B A x`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).

Functions here work on any array type with ``.shape`` and ``.T`` (numpy or mlx), so the
MLX backend shares the key and config logic; file I/O is numpy (BF16 read as fp32).

mlx-lm writes adapters its own way (``adapters.safetensors``, keys
``<module path>.lora_a`` (in, r), ``.lora_b`` (r, out), ``.m``, and an
``adapter_config.json`` with ``lora_parameters: {rank, scale, dropout}``);
:func:`convert_mlx_lm_adapter` turns one into a PEFT adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import opt, register
from common.errors import UserError

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
MLX_LM_WEIGHTS = "adapters.safetensors"
# PEFT tensor-name suffix -> our field name
_PEFT_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_magnitude_vector": "magnitude"}
_MLX_SUFFIXES = {".lora_a": "a", ".lora_b": "b", ".m": "magnitude"}
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass
class AdapterModule:
    """One adapted linear layer, in PEFT orientation."""

    a: Any  # (r, in)
    b: Any  # (out, r)
    magnitude: Any = None  # (out,) DoRA only
    scale: float = 1.0  # multiplies B A x
    alpha: float | None = None  # the lora_alpha that gives ``scale`` (None: derive from scale)

    @property
    def r(self) -> int:
        return int(self.a.shape[0])


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def layer_index(path: str) -> int | None:
    """The transformer block number in a module path (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = _LAYER_RE.search("." + path + ".")
    return int(m.group(1)) if m else None


def peft_targets(paths: list[str]) -> tuple[list[str], list[int] | None]:
    """``target_modules`` (and ``layers_to_transform``) that make PEFT adapt exactly ``paths``.

    Leaf names plus a layer list when the adapted set is leaf names x layers (the usual
    case); otherwise the full module paths, which PEFT matches by suffix.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    layers = sorted({i for i in (layer_index(p) for p in paths) if i is not None})
    if any(layer_index(p) is None for p in paths):
        return sorted(paths), None
    product = {(leaf, i) for leaf in leaves for i in layers}
    actual = {(p.rsplit(".", 1)[-1], layer_index(p)) for p in paths}
    if product != actual or len(actual) != len(paths):
        return sorted(paths), None
    return leaves, layers


def _pattern_value(patterns: Mapping[str, Any], path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path by suffix or regex."""
    for key, value in (patterns or {}).items():
        if path == key or path.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def check_peft_config(config: dict, source: str) -> None:
    """Reject adapter configs that are not plain LoRA/DoRA (a UserError naming the key)."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type: {config.get('peft_type')!r} (only LORA adapters are supported)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            problems.append(f"{key}: missing or not a positive number ({config.get(key)!r})")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save: {config['modules_to_save']} (fully trained modules are not supported)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out: true (Conv1D-style weights are not supported)")
    if problems:
        raise UserError(f"{source}: unsupported adapter", problems)


def modules_from_peft(tensors: Mapping[str, Any], config: dict, source: str) -> dict[str, AdapterModule]:
    """Group PEFT tensors by module path (prefix stripped) and attach each module's scale."""
    check_peft_config(config, source)
    parts: dict[str, dict[str, Any]] = {}
    problems = []
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, field in _PEFT_SUFFIXES.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[field] = value
                break
        else:
            problems.append(f"{key}: not a LoRA tensor (embedding LoRA, biases and saved modules are not supported)")
    return _assemble(parts, problems, config, source)


def _assemble(parts: dict[str, dict[str, Any]], problems: list[str], config: dict, source: str,
              scale: float | None = None) -> dict[str, AdapterModule]:
    modules: dict[str, AdapterModule] = {}
    for path, p in sorted(parts.items()):
        if "a" not in p or "b" not in p:
            problems.append(f"{path}: has {sorted(p)} but needs both lora_A and lora_B")
            continue
        a, b, mag = p["a"], p["b"], p.get("magnitude")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain (r, in) x (out, r)")
            continue
        if mag is not None and tuple(mag.shape) != (b.shape[0],):
            problems.append(f"{path}: magnitude {tuple(mag.shape)} does not match out features {b.shape[0]}")
            continue
        r = int(a.shape[0])
        if scale is None:
            alpha = float(_pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"]))
            modules[path] = AdapterModule(a, b, mag, lora_scale(alpha, r, bool(config.get("use_rslora"))), alpha)
        else:
            modules[path] = AdapterModule(a, b, mag, scale)
    if not modules and not problems:
        problems.append("no LoRA tensors found")
    if problems:
        raise UserError(f"{source}: invalid adapter", problems)
    return modules


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a UserError naming the file and line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_tensors(path: Path) -> dict[str, Any]:
    """All tensors of a safetensors file as float32 numpy arrays (BF16 included)."""
    from common.export.st_io import SafeTensorsFile

    if not path.exists():
        raise UserError(f"{path}: not found")
    f = SafeTensorsFile(path)
    return {name: f.float32(name) for name in f.keys()}


def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict[str, AdapterModule], dict]:
    """(modules by path, adapter_config) of a PEFT adapter directory, arrays as fp32 numpy."""
    d = Path(adapter_dir)
    config = read_json(d / PEFT_CONFIG)
    return modules_from_peft(read_tensors(d / PEFT_WEIGHTS), config, str(d)), config


def peft_config(paths: list[str], *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                use_rslora: bool = False, use_dora: bool = False, base_model: str | None = None,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> dict:
    """An ``adapter_config.json`` that makes ``peft.PeftModel.from_pretrained`` rebuild this adapter."""
    targets, layers = peft_targets(paths)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(r), "lora_alpha": float(lora_alpha), "lora_dropout": float(lora_dropout),
        "use_rslora": bool(use_rslora), "use_dora": bool(use_dora),
        "target_modules": targets, "layers_to_transform": layers, "layers_pattern": None,
        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True, "revision": None,
    }


def write_peft_adapter(out_dir: str | Path, tensors: Mapping[str, Any], config: dict,
                       metadata: dict | None = None, whole_dir: bool = False) -> Path:
    """Write PEFT-named numpy ``tensors`` and ``config`` into ``out_dir``.

    Each file is written atomically; with ``whole_dir`` the directory is built aside and
    swapped in whole (replacing an existing one), else the files go into ``out_dir`` as is.
    """
    import numpy as np
    from safetensors.numpy import save_file

    from common.io import atomic_dir, atomic_path, write_json

    out = Path(out_dir)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}
    if whole_dir:
        with atomic_dir(out) as tmp:
            save_file(arrays, str(tmp / PEFT_WEIGHTS), metadata=meta)
            write_json(tmp / PEFT_CONFIG, config)
        return out
    with atomic_path(out / PEFT_WEIGHTS) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
    write_json(out / PEFT_CONFIG, config)
    return out


def peft_tensors(modules: Mapping[str, AdapterModule]) -> dict[str, Any]:
    """PEFT key -> array for each module (PEFT orientation already)."""
    out = {}
    for path, m in modules.items():
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.a
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.b
        if m.magnitude is not None:
            out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = m.magnitude
    return out


def config_for_modules(modules: Mapping[str, AdapterModule], *, use_rslora: bool = False, lora_dropout: float = 0.0,
                       base_model: str | None = None) -> dict:
    """A PEFT config whose alpha (and per-module patterns) reproduce each module's rank and scale."""
    paths = sorted(modules)
    ranks = {p: modules[p].r for p in paths}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    def alpha_of(p: str) -> float:
        if modules[p].alpha is not None:
            return float(modules[p].alpha)
        return modules[p].scale * (math.sqrt(ranks[p]) if use_rslora else ranks[p])
    alpha = alpha_of(next(p for p in paths if ranks[p] == r))
    rank_pattern = {p: ranks[p] for p in paths if ranks[p] != r}
    alpha_pattern = {p: alpha_of(p) for p in paths if not math.isclose(alpha_of(p), alpha, rel_tol=1e-6)}
    use_dora = any(m.magnitude is not None for m in modules.values())
    return peft_config(paths, r=r, lora_alpha=alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                       use_dora=use_dora, base_model=base_model, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


# ---------------------------------------------------------------------------
# mlx-lm adapters


def read_mlx_lm_adapter(src_dir: str | Path) -> tuple[dict[str, AdapterModule], dict]:
    """(modules in PEFT orientation, mlx-lm config) of an mlx-lm adapter directory."""
    d = Path(src_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a directory (expected an mlx-lm adapter dir with {MLX_LM_WEIGHTS})")
    config = read_json(d / PEFT_CONFIG)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise UserError(f"{d / PEFT_CONFIG}: fine_tune_type {kind!r} is not an adapter (only lora and dora convert)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("scale"), (int, float)):
        raise UserError(f"{d / PEFT_CONFIG}: lora_parameters.scale missing (is this an mlx-lm adapter?)")
    tensors = read_tensors(d / MLX_LM_WEIGHTS)
    parts: dict[str, dict[str, Any]] = {}
    problems = []
    for key, value in tensors.items():
        for suffix, field in _MLX_SUFFIXES.items():
            if key.endswith(suffix):
                # mlx-lm keeps lora_a (in, r) and lora_b (r, out): transpose into PEFT's (r, in), (out, r)
                parts.setdefault(key[: -len(suffix)], {})[field] = value.T if field != "magnitude" else value
                break
        else:
            problems.append(f"{d / MLX_LM_WEIGHTS}: {key}: not a LoRA tensor (full fine-tunes and "
                            "embedding/MoE LoRA do not convert)")
    for path, p in parts.items():
        if "a" in p and len(p["a"].shape) != 2:
            problems.append(f"{path}: lora_a has shape {tuple(p['a'].T.shape)}; only 2-D (linear) LoRA converts")
    modules = _assemble(parts, problems, config, str(d), scale=float(params["scale"]))
    if kind == "dora" and any(m.magnitude is None for m in modules.values()):
        raise UserError(f"{d}: fine_tune_type is dora but some modules have no magnitude (.m) tensor")
    return modules, config


def convert_mlx_lm_adapter(src_dir: str | Path, out_dir: str | Path | None = None,
                           base_model: str | None = None) -> Path:
    """Convert an mlx-lm adapter directory into a PEFT adapter; returns the output directory.

    ``lora_alpha`` is written as ``scale * r`` so PEFT's ``alpha / r`` equals mlx-lm's
    scale; the base model is ``base_model`` or the ``model`` the adapter was trained on.
    Default output: ``<src_dir>-peft`` beside the source.
    """
    src = Path(src_dir)
    modules, config = read_mlx_lm_adapter(src)
    out = Path(out_dir) if out_dir else src.with_name(src.name.rstrip("/") + "-peft")
    if out.resolve() == src.resolve():
        raise UserError(f"{out}: the output directory must differ from the mlx-lm adapter directory")
    base = base_model or config.get("model")
    dropout = float(config["lora_parameters"].get("dropout", 0.0))
    peft_cfg = config_for_modules(modules, lora_dropout=dropout, base_model=base)
    return write_peft_adapter(out, peft_tensors(modules), peft_cfg, metadata={"converted_from": "mlx-lm"},
                              whole_dir=True)


@register
@dataclass
class ModelsImportAdapterConfig:
    """``llm-ft models import-adapter``: an mlx-lm adapter directory -> a PEFT adapter."""

    dir: str = opt(help="mlx-lm adapter directory (adapters.safetensors + adapter_config.json)", positional=True)
    out: str | None = opt(None, "output directory (default: DIR-peft beside DIR)")
    base_model: str | None = opt(None, "base_model_name_or_path to record (default: the 'model' the adapter "
                                    "was trained on, from its adapter_config.json)")


IMPORT_ADAPTER_HELP = ("convert an mlx-lm LoRA/DoRA adapter (adapters.safetensors) into a PEFT adapter, "
                       "the format merge, export, eval and chat read (lora_alpha = scale * r)")


def run_import_adapter(cfg: ModelsImportAdapterConfig) -> int:
    """Convert ``cfg.dir``; print what was written."""
    out = convert_mlx_lm_adapter(cfg.dir, cfg.out, base_model=cfg.base_model)
    c = read_json(out / PEFT_CONFIG)
    print(f"wrote PEFT adapter {out}/ ({PEFT_WEIGHTS}, {PEFT_CONFIG}): r={c['r']} lora_alpha={c['lora_alpha']:g} "
          f"use_dora={c['use_dora']} targets={','.join(c['target_modules'])}")
    return 0
