"""Stage the folder ``llm-ft push`` uploads: exactly these files go to the Hub.

``RUN/push/<what>/`` is rebuilt whole on every push (temporary name, then swapped in):

- adapter: ``adapter_model.safetensors``, ``adapter_config.json`` whose
  ``base_model_name_or_path`` is the base model's Hub id (and ``revision`` its commit,
  where known), never a path on this machine;
- merged: the merged Hugging Face model (``RUN/merged``, written first if missing);
- gguf: the newest ``RUN/export/*.gguf`` (or the one named) and its Modelfile.

Each also gets ``README.md`` (the model card), ``system_prompt.txt`` when the run has one,
and ``training_config.json``: the run's options without local paths.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.io import atomic_dir
from common.models.hub import is_hub_id

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded default model's origin
# Run config keys that hold paths on this machine: left out of the uploaded training_config.json.
LOCAL_KEYS = ("out", "data", "system_prompt_file", "json_schema", "chat_template", "base_model", "device")


def base_hub_id(run_config: dict[str, Any], override: str | None = None) -> tuple[str | None, str | None]:
    """(Hub id, revision) of the run's base model; (None, None) when it is local only.

    ``override`` (``--base-model ID[@REV]``) names it for a base loaded from a local copy.
    """
    if override:
        repo, _, rev = override.partition("@")
        if not is_hub_id(repo):
            raise UserError(f"--base-model {override}: expected a Hugging Face id (org/name[@revision])")
        return repo, rev or None
    info = run_config.get("base_model") or {}
    spec = str(info.get("spec") or run_config.get("model") or "")
    source = info.get("source")
    if source == "default" or spec in ("", "default"):
        return DEFAULT_HUB_ID, None
    if source == "hub" or (source is None and is_hub_id(spec) and not Path(spec).exists()):
        path = Path(str(info.get("path", "")))
        commit = path.name if path.parent.name == "snapshots" else None  # huggingface_hub's cache layout
        return spec, commit or run_config.get("revision")
    return None, None


def public_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run's options minus anything naming a file on this machine."""
    return {k: v for k, v in run_config.items() if k not in LOCAL_KEYS}


def _link(src: Path, dst: Path) -> None:
    """Hard link when possible (a GGUF or merged model is gigabytes), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def adapter_config_for_hub(adapter_dir: Path, base: str | None, revision: str | None) -> dict[str, Any]:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base  # None (not a local path) when the base is not on the Hub
    cfg["revision"] = revision
    return cfg


def choose_gguf(run_dir: Path, name: str | None) -> Path:
    export = run_dir / "export"
    if name:
        p = Path(name) if Path(name).is_file() else export / name
        if not p.is_file() or p.suffix != ".gguf":
            raise UserError(f"--gguf {name}: no such .gguf file (in {export})")
        return p
    found = sorted(export.glob("*.gguf"), key=lambda p: p.stat().st_mtime) if export.is_dir() else []
    found = [p for p in found if p.name != "adapter.gguf"]
    if not found:
        raise UserError(f"{run_dir}: no GGUF to push in {export}", [f"run `llm-ft export {run_dir}` first"])
    return found[-1]


def stage(run_dir: Path, what: str, out: Path, *, base: str | None, revision: str | None, card: str,
          run_config: dict[str, Any], system_prompt: str | None, gguf: Path | None = None) -> list[str]:
    """Build the upload folder ``out``; returns its files (relative, sorted)."""
    with atomic_dir(out) as tmp:
        if what == "adapter":
            _link(run_dir / "adapter" / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
            cfg = adapter_config_for_hub(run_dir / "adapter", base, revision)
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        elif what == "merged":
            merged = run_dir / "merged"
            if not (merged / "config.json").is_file():
                from common.export.merge_cmd import MergeConfig, run

                run(MergeConfig(run=str(run_dir)))
            for f in sorted(p for p in merged.rglob("*") if p.is_file()):
                _link(f, tmp / f.relative_to(merged))
        else:
            assert gguf is not None
            _link(gguf, tmp / gguf.name)
            modelfile = gguf.with_name("Modelfile")
            if modelfile.is_file():
                text = modelfile.read_text(encoding="utf-8")
                (tmp / "Modelfile").write_text(text, encoding="utf-8")
        if system_prompt is not None:
            (tmp / "system_prompt.txt").write_text(system_prompt, encoding="utf-8")
        (tmp / "training_config.json").write_text(json.dumps(public_config(run_config), indent=2) + "\n",
                                                  encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
