"""Facts about models on this machine: what is cached, and what one model is.

Plain data (dicts, lists) for ``llm-ft models list`` and ``llm-ft models info``; the
command module only prints them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.archs import ARCHS, by_hf_arch
from common.models.gguf_import import IMPORT_RECORD, models_home
from common.models.safety import read_json


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else str(config.get("model_type", "?"))


def list_models(include_hub: bool = True) -> list[dict[str, Any]]:
    """Imported GGUFs under $LLM_FT_HOME/models and models in the Hugging Face cache."""
    rows: list[dict[str, Any]] = []
    home = models_home()
    if home.is_dir():
        for d in sorted(p for p in home.iterdir() if p.is_dir() and not p.name.startswith(".")):
            record = read_json(d / IMPORT_RECORD)
            if not record:
                continue
            config = read_json(d / "config.json")
            rows.append({"name": d.name, "source": "gguf import", "path": str(d), "size": dir_size(d),
                         "architecture": _architecture(config), "from": record.get("source")})
    if include_hub:
        from huggingface_hub import scan_cache_dir

        from common.models.hub import cache_dir

        try:
            info = scan_cache_dir(cache_dir())
        except Exception:  # no cache yet (CacheNotFound) or an unreadable one: nothing to list
            info = None
        for repo in sorted(info.repos if info else [], key=lambda r: r.repo_id):
            if repo.repo_type != "model":
                continue
            newest = max(repo.revisions, key=lambda r: r.last_modified, default=None)
            config = read_json(Path(newest.snapshot_path) / "config.json") if newest else {}
            rows.append({"name": repo.repo_id, "source": "hub cache", "path": str(newest.snapshot_path) if newest else "",
                         "size": repo.size_on_disk, "architecture": _architecture(config) if config else "?",
                         "from": newest.commit_hash if newest else None})
    return rows


def parameter_count(model_dir: Path) -> tuple[int, dict[str, int]]:
    """(number of parameters, elements per dtype) from the safetensors headers; no weight is read."""
    from safetensors import safe_open

    total, dtypes = 0, {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n
                dtype = sl.get_dtype()
                dtypes[dtype] = dtypes.get(dtype, 0) + n
    return total, dtypes


def tokenizer_facts(model_dir: Path) -> dict[str, Any]:
    """Tokenizer type, size, chat template and special tokens (transformers, no torch)."""
    from common.models import load_tokenizer
    from common.prompts import END_OF_TURN_TOKENS

    tok = load_tokenizer(model_dir)
    data = read_json(model_dir / "tokenizer.json") if (model_dir / "tokenizer.json").exists() else {}
    kind = (data.get("model") or {}).get("type", type(tok).__name__)
    if "ByteLevel" in json.dumps(data.get("pre_tokenizer") or {}):
        kind += " (byte-level)"
    elif (data.get("model") or {}).get("byte_fallback"):
        kind += " (SentencePiece-style, byte fallback)"
    vocab = tok.get_vocab()
    special = {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {"type": kind, "size": len(tok), "chat_template": bool(getattr(tok, "chat_template", None)),
            "special": {k: v for k, v in special.items() if v}, "add_bos_token": getattr(tok, "add_bos_token", None),
            "end_of_turn": [t for t in END_OF_TURN_TOKENS if t in vocab]}


def exporter_support(config: dict[str, Any]) -> tuple[bool, str]:
    """Whether `llm-ft export` can write this architecture to GGUF."""
    arch = _architecture(config)
    spec = by_hf_arch(arch)
    if spec is not None:
        return True, f"yes (GGUF architecture {spec.gguf_name})"
    return False, f"no: {arch} is not in the exporter's table ({', '.join(ARCHS)})"
