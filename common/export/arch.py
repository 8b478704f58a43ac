"""How export finds a model's architecture: its config read as :class:`HParams`, and the
row of :mod:`common.archs` that says how it becomes a llama.cpp GGUF."""

from __future__ import annotations

from pathlib import Path

from common.archs import ARCHS, ArchSpec, HParams, by_hf_arch, permute_rows
from common.errors import UserError
from common.export import hf_config

__all__ = ["ARCHS", "ArchSpec", "HParams", "load_hparams", "load_hparams_transformers", "permute_rows", "spec_for"]


def load_hparams(model_dir: str | Path) -> HParams:
    """config.json with transformers' defaults filled and rope normalised.

    Read without transformers for the model types the table knows (transformers imports
    torch for any config class: seconds); through ``AutoConfig`` for any other.
    """
    hp = hf_config.read_hparams(model_dir)
    return hp if hp is not None else load_hparams_transformers(model_dir)


def load_hparams_transformers(model_dir: str | Path) -> HParams:
    """config.json through ``transformers.AutoConfig`` (imports torch)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError, StrictDataclassError) as exc:  # the last: transformers 5's field checks
        raise UserError(f"{model_dir}/config.json: cannot read the model config: {exc}") from None
    text = config.get_text_config()
    archs = getattr(config, "architectures", None) or getattr(text, "architectures", None) or []
    hf_arch = archs[0] if archs else ""
    cfg = text.to_dict()
    cfg["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", cfg.get("tie_word_embeddings", True)))
    return HParams(cfg, hf_arch, getattr(text, "model_type", ""))


def spec_for(hp: HParams) -> ArchSpec:
    """The ArchSpec for a model's ``architectures[0]``, or a UserError listing what is supported."""
    spec = by_hf_arch(hp.hf_arch)
    if spec is not None:
        return spec
    supported = ", ".join(a for s in ARCHS.values() for a in s.hf_archs)
    raise UserError(f"architecture {hp.hf_arch or hp.model_type!r} cannot be exported to GGUF yet "
                    f"(supported: {supported})")
