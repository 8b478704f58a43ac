"""mlx-lm adapters -> PEFT adapters, and ``llm-ft models import-adapter``.

mlx-lm writes adapters its own way (``adapters.safetensors``, keys ``<module path>.lora_a``
(in, r), ``.lora_b`` (r, out), ``.m``, and an ``adapter_config.json`` with
``lora_parameters: {rank, scale, dropout}``); :func:`convert_mlx_lm_adapter` turns one into
a PEFT adapter. Reading, validating and writing PEFT adapters is :mod:`common.peft`'s
(the names below are re-exported from there for existing callers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import opt, register
from common.errors import UserError
from common.peft import (  # noqa: F401  (re-exported: mlx_ft.lora and older callers import them from here)
    CONFIG,
    WEIGHTS,
    AdapterModule,
    config_for_modules,
    lora_scale,
    peft_config,
    peft_targets,
    peft_tensors,
    read_json,
    read_peft_adapter,
    shape_problems,
    write_peft_adapter,
)

MLX_LM_WEIGHTS = "adapters.safetensors"
_MLX_SUFFIXES = {".lora_a": "a", ".lora_b": "b", ".m": "magnitude"}


def read_tensors(path: Path) -> dict[str, Any]:
    """All tensors of a safetensors file as float32 numpy arrays (BF16 included), checked whole."""
    from common.peft import open_weights

    if not path.exists():
        raise UserError(f"{path}: not found")
    f = open_weights(path)
    return {name: f.float32(name) for name in f.keys()}


def read_mlx_lm_adapter(src_dir: str | Path) -> tuple[dict[str, AdapterModule], dict]:
    """(modules in PEFT orientation, mlx-lm config) of an mlx-lm adapter directory."""
    d = Path(src_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a directory (expected an mlx-lm adapter dir with {MLX_LM_WEIGHTS})")
    config = read_json(d / CONFIG)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise UserError(f"{d / CONFIG}: fine_tune_type {kind!r} is not an adapter (only lora and dora convert)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("scale"), (int, float)):
        raise UserError(f"{d / CONFIG}: lora_parameters.scale missing (is this an mlx-lm adapter?)")
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
    scale, modules = float(params["scale"]), {}
    for path, p in sorted(parts.items()):
        if "a" not in p or "b" not in p:
            problems.append(f"{path}: has {sorted(p)} but needs both lora_A and lora_B")
            continue
        bad = shape_problems(path, p["a"].shape, p["b"].shape, None if p.get("magnitude") is None else p["magnitude"].shape)
        problems += bad
        if not bad:
            modules[path] = AdapterModule(p["a"], p["b"], p.get("magnitude"), scale)
    if not modules and not problems:
        problems.append("no LoRA tensors found")
    if problems:
        raise UserError(f"{d}: invalid adapter", problems)
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
    c = read_json(out / CONFIG)
    print(f"wrote PEFT adapter {out}/ ({WEIGHTS}, {CONFIG}): r={c['r']} lora_alpha={c['lora_alpha']:g} "
          f"use_dora={c['use_dora']} targets={','.join(c['target_modules'])}")
    return 0
