"""Base models: resolve a --model spec to a local Hugging Face directory.

(Being extended by the models work: Hub ids, GGUF import, the embedded default.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common.errors import UserError


@dataclass
class ResolvedModel:
    spec: str
    path: Path  # a Hugging Face-style directory: config.json, *.safetensors, tokenizer files
    source: str  # "local" | "hub" | "gguf" | "default"
    gguf_file: Optional[Path] = None


def resolve_model(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> ResolvedModel:
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"{p}: not a model directory (no config.json)")
        return ResolvedModel(spec, p.resolve(), "local")
    raise UserError(f"model {spec!r}: not found")


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer (transformers, fast; works without torch)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
