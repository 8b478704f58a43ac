"""What a model may contain before we load it: safetensors weights, no custom code.

Pickle weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) run arbitrary code when loaded, so
a model that has only those is refused. A model whose ``config.json`` (or tokenizer
config) names Python code of its own (``auto_map``), or whose ``model_type`` this
transformers does not know, would run code from the model's repository: refused unless
the user passes ``--trust-remote-code``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _pickle_refusal(where: str, pickles: list[str]) -> UserError:
    shown = ", ".join(sorted(pickles)[:4]) + (" ..." if len(pickles) > 4 else "")
    return UserError(
        f"{where}: the model has only pickle weights ({shown}); refused",
        ["loading a pickle file can run arbitrary code, so llm-ft reads safetensors only",
         "look for a safetensors version of this model (on the Hub, often a 'refs/pr/N' revision or another repo)",
         "or convert it yourself in a sandbox you trust (transformers: save_pretrained(safe_serialization=True))"])


def check_weight_files(files: Iterable[str], where: str) -> None:
    """Refuse a file list (a repo's or a directory's) that has pickle weights but no safetensors."""
    names = [str(f) for f in files]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise _pickle_refusal(where, pickles)
    raise UserError(f"{where}: no model weights found (expected *.safetensors)")


def known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def check_config(config: dict[str, Any], where: str, trust_remote_code: bool,
                 tokenizer_config: dict[str, Any] | None = None) -> None:
    """Refuse custom code (auto_map, unknown model_type) unless ``trust_remote_code``."""
    if trust_remote_code:
        return
    problems = []
    for name, cfg in (("config.json", config), ("tokenizer_config.json", tokenizer_config or {})):
        auto_map = cfg.get("auto_map")
        if auto_map:
            classes = auto_map.values() if isinstance(auto_map, dict) else auto_map
            problems.append(f"{name}: auto_map names the model's own code: {', '.join(map(str, classes))}")
    model_type = config.get("model_type")
    if not model_type:
        problems.append("config.json: no model_type")
    elif not known_model_type(model_type):
        import transformers

        problems.append(f"config.json: model_type {model_type!r} is unknown to transformers {transformers.__version__} "
                        "(a newer transformers may know it)")
    if problems:
        raise UserError(f"{where}: the model needs custom code from its repository; refused "
                        "(pass --trust-remote-code if you trust its authors)", problems)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise UserError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def check_model_dir(model_dir: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Check a Hugging Face directory before anything loads it; return its config."""
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model directory (no config.json)")
    config = read_json(model_dir / "config.json")
    check_weight_files((p.name for p in model_dir.iterdir()), str(model_dir))
    check_config(config, str(model_dir), trust_remote_code, read_json(model_dir / "tokenizer_config.json"))
    return config
