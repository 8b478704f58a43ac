"""What a run is, for resuming: the settings and inputs a checkpoint only fits with.

A resume must continue the same run: the same adapter shape on the same base, the same
tokenizer, the same tokenized data in the same order. :func:`run_info` collects those
as plain JSON; :func:`common.train.checkpoint.check_compatible` lists every difference.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.rows import Example

# Settings that change the adapter's shape or the data order (so a checkpoint's meaning).
RESUME_KEYS = ("lora_r", "lora_alpha", "targets", "num_layers", "use_dora", "use_rslora", "load_in_4bit",
               "load_in_8bit", "seed", "batch_size", "grad_accum", "packing", "group_by_length", "max_seq_length")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def base_model_fingerprint(model_dir: Path) -> str:
    """config.json content plus weight file names and sizes (hashing GBs of weights would take minutes)."""
    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.json"
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    weights = sorted((p.name, p.stat().st_size) for p in model_dir.glob("*.safetensors"))
    return _sha({"config": config, "weights": weights})


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, special tokens and chat template: what decides the token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    template = getattr(tokenizer, "chat_template", None)
    special = {k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return _sha({"vocab": vocab, "template": template, "special": special})


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """The tokenized training data exactly (system prompt, template, truncation included)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.loss_mask], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def run_info(cfg: Any, *, backend: str, model_dir: Path, tokenizer, data_fingerprint: dict[str, Any],
             train_examples: Sequence[Example]) -> dict[str, Any]:
    """The identity a checkpoint records and a resume must match."""
    info: dict[str, Any] = {k: getattr(cfg, k) for k in RESUME_KEYS}
    info["targets"] = sorted(info["targets"])
    info["backend"] = backend
    info["base_model"] = base_model_fingerprint(model_dir)
    info["tokenizer"] = tokenizer_fingerprint(tokenizer)
    info["data"] = data_fingerprint.get("sha256")
    info["train_examples"] = examples_fingerprint(train_examples)
    return info
