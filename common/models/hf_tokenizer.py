"""Which transformers tokenizer class a local model directory loads as, decided without
``AutoTokenizer``.

``transformers.models.auto.tokenization_auto`` imports torch (about 2 s on a 2-CPU host,
and an export needs no torch otherwise); a tokenizer class's own module does not (0.7 s).
For the model families we export, :func:`tokenizer_class` follows ``AutoTokenizer.
from_pretrained``'s choice (transformers 5) from config.json's ``model_type`` and
tokenizer_config.json's ``tokenizer_class``: a Llama class over a byte-level tokenizer.json
becomes the generic backend; a model type whose registered class differs from the declared
one decides as AutoTokenizer's tables say; otherwise the declared class, "Fast" stripped.
Anything else (remote code, an unknown class or model type, a relative path) gives None:
the caller uses AutoTokenizer. tests/test_hf_tokenizer.py holds the tables and the choice
equal to transformers'.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

GENERIC = "TokenizersBackend"  # the tokenizers-backed class with no model-specific behaviour
# Declared class name ("Fast" stripped) -> (module, class) that AutoTokenizer's tokenizer_class_from_name returns.
CLASSES: dict[str, tuple[str, str]] = {
    GENERIC: ("transformers.tokenization_utils_tokenizers", GENERIC),
    "PreTrainedTokenizer": ("transformers.tokenization_utils_tokenizers", GENERIC),  # v4 name of the generic class
    "GPT2Tokenizer": ("transformers.models.gpt2.tokenization_gpt2", "GPT2Tokenizer"),
    "LlamaTokenizer": ("transformers.models.llama.tokenization_llama", "LlamaTokenizer"),
    "Qwen2Tokenizer": ("transformers.models.qwen2.tokenization_qwen2", "Qwen2Tokenizer"),
    "GemmaTokenizer": ("transformers.models.gemma.tokenization_gemma", "GemmaTokenizer"),
}
# config.json model_type -> (the class AutoTokenizer registers for it (TOKENIZER_MAPPING_NAMES; None: none),
# whether its Hub checkpoints are known to declare a wrong class (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)).
MODEL_TYPES: dict[str, tuple[str | None, bool]] = {
    "llama": (None, False),
    "mistral": (GENERIC, False),
    "qwen2": ("Qwen2Tokenizer", True),
    "qwen3": ("Qwen2Tokenizer", False),
    "gemma2": ("GemmaTokenizer", False),
    "gemma3": ("GemmaTokenizer", False),
    "gemma3_text": ("GemmaTokenizer", False),
    "phi3": (GENERIC, True),
}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tokenizer_class_name(model_dir: str | Path) -> str | None:
    """The name of the class (a key of :data:`CLASSES`) AutoTokenizer would load ``model_dir`` as,
    or None when that is not decided here."""
    model_dir = Path(model_dir)
    # AutoTokenizer matches the path against Hub ids (MODEL_IDS_TO_TOKENIZERS_BACKEND: "org/name-*");
    # an absolute path never matches them.
    if not model_dir.is_absolute():
        return None
    tok_cfg, cfg = _json(model_dir / "tokenizer_config.json"), _json(model_dir / "config.json")
    if tok_cfg is None or cfg is None or "auto_map" in tok_cfg or "model_name" in cfg:
        return None  # remote code; model_name feeds AutoTokenizer's special cases
    declared, model_type = tok_cfg.get("tokenizer_class"), cfg.get("model_type")
    if not isinstance(declared, str) or model_type not in MODEL_TYPES:
        return None
    registered, hub_is_wrong = MODEL_TYPES[model_type]
    declared = declared.removesuffix("Fast")
    if declared == "LlamaTokenizer" and not hub_is_wrong and _byte_level(model_dir):
        return GENERIC  # LlamaTokenizer builds a Metaspace pre-tokenizer; a byte-level tokenizer.json is not one
    if registered is not None and registered != declared:
        if registered == GENERIC:
            return GENERIC
        name = registered if hub_is_wrong else declared
        return name if name in CLASSES else None
    return declared if declared in CLASSES else None


def _byte_level(model_dir: Path) -> bool:
    """Whether tokenizer.json has a ByteLevel part (transformers' own test, a text search)."""
    try:
        return '"ByteLevel"' in (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    except OSError:
        return False


def tokenizer_class(model_dir: str | Path):
    """The transformers class AutoTokenizer would load ``model_dir`` as, imported from its own
    module (no torch), or None when :func:`tokenizer_class_name` does not decide it."""
    name = tokenizer_class_name(model_dir)
    if name is None:
        return None
    module, attr = CLASSES[name]
    return getattr(importlib.import_module(module), attr)
