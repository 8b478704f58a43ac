"""A run directory describes itself; eval, merge, export, chat and serve need only it.

Layout (written by ``llm-ft train``)::

    runs/<name>/
      config.json            resolved TrainConfig + {"backend": ..., "base_model": {...}}
      adapter/               best adapter, PEFT format (adapter_model.safetensors + adapter_config.json)
      checkpoints/step-N/    adapter + optimizer/RNG/loop state + manifest.json (checksums)
      system_prompt.txt      the exact system prompt used in training (absent if none)
      data_fingerprint.json  counts and hashes of the training data
      metrics.jsonl          one JSON object per logged event
      loss.png, summary.json
      eval/                  metrics.json, errors.jsonl, confusion.png
      export/                model.gguf, Modelfile, verify.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.peft import WEIGHTS


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists() and (p / "adapter").is_dir()


@dataclass
class RunDir:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"{p}: run directory not found")
        if not (p / "config.json").exists():
            raise UserError(f"{p}: not a run directory (no config.json)")
        if not (p / "adapter" / WEIGHTS).exists():
            raise UserError(f"{p}: run has no adapter yet (adapter/{WEIGHTS} missing)")
        return cls(p)

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def config(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.path / 'config.json'}:{exc.lineno}: invalid JSON: {exc.msg}") from None

    def base_model(self) -> Path:
        """The original (full-precision) base model directory the adapter was trained on."""
        info = self.config().get("base_model") or {}
        path = Path(info.get("path", ""))
        if not info or not path.is_dir():
            from common.models import resolve_model

            spec = self.config().get("model", "default")
            return resolve_model(spec, self.config().get("revision")).path
        return path

    def system_prompt(self) -> str | None:
        f = self.path / "system_prompt.txt"
        return f.read_text(encoding="utf-8") if f.exists() else None

    def chat_template_override(self) -> str | None:
        return self.config().get("chat_template")

    def summary(self) -> dict[str, Any]:
        f = self.path / "summary.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}
