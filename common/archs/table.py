"""The architecture table: one :class:`ArchSpec` row per supported Hugging Face family.

Export (:mod:`common.export`), GGUF import (:mod:`common.models.gguf_arch`), the config
reader (:mod:`common.export.hf_config`), the model catalog, the memory estimate, the MLX
mask and the tests all read these rows. Adding an architecture is one row here plus its
tiny model in tests/tiny.py's ``ARCH_CONFIGS``; tests/test_archs.py fails until both exist.
"""

from __future__ import annotations

from typing import Any

from common.archs import gguf_meta as g
from common.archs.spec import ArchSpec

# transformers 5 config classes' field defaults of the keys export reads or derives them from;
# tests/test_hf_config.py compares them with the classes.
_LLAMA = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
_QWEN2 = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
          "max_window_layers": 28, "layer_types": None}
_GEMMA2 = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
           "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
           "layer_types": None, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
_GEMMA = {"norm_shift": 1.0, "always_tied": True, "sandwich_norms": True, "add_space_prefix": False}

_ROWS = (
    ArchSpec("llama", "llama", ("LlamaForCausalLM",), "llama", _LLAMA, g.llama_params, g.llama_config,
             g.llama3_rope_freqs, permute_qk=True, mlx_model="llama"),
    ArchSpec("mistral", "llama", ("MistralForCausalLM",), "mistral",
             {**_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 131072,
              "sliding_window": 4096},
             g.llama_params, g.llama_config, g.llama3_rope_freqs, permute_qk=True, mlx_model="llama",
             notes=("llama.cpp's llama graph ignores Mistral's sliding window",
                    "a GGUF of it imports back through the llama row")),
    ArchSpec("qwen2", "qwen2", ("Qwen2ForCausalLM",), "qwen2", _QWEN2, g.qwen_params, g.qwen2_config,
             qkv_bias=True, mlx_model="qwen2"),
    ArchSpec("qwen3", "qwen3", ("Qwen3ForCausalLM",), "qwen3", {**_QWEN2, "head_dim": 128}, g.qwen_params,
             g.qwen3_config, qk_norm=True, mlx_model="qwen3"),
    ArchSpec("gemma2", "gemma2", ("Gemma2ForCausalLM",), "gemma2", _GEMMA2, g.gemma2_params, g.gemma2_config,
             mlx_model="gemma2", mlx_grouped_mask=True, **_GEMMA),
    ArchSpec("gemma3", "gemma3", ("Gemma3ForCausalLM",), "gemma3_text",
             {**_GEMMA2, "vocab_size": 262208, "max_position_embeddings": 131072, "final_logit_softcapping": None,
              "attn_logit_softcapping": None, "use_bidirectional_attention": False},
             g.gemma3_params, g.gemma3_config, composite=("gemma3", "text_config", True), qk_norm=True,
             mlx_model="gemma3_text", **_GEMMA),
    # Older llama.cpp builds (and so some Ollama releases) require output.weight for phi3.
    ArchSpec("phi3", "phi3", ("Phi3ForCausalLM",), "phi3",
             {"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "max_position_embeddings": 4096,
              "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "sliding_window": None},
             g.phi3_params, g.phi3_config, g.phi3_rope_factors, needs_output=True, fused=True, mlx_model="phi3"),
)

ARCHS: dict[str, ArchSpec] = {row.name: row for row in _ROWS}

# GGUF general.architecture -> the row a GGUF of it imports as: the first row writing that name
# (Mistral is written as "llama" and comes back as Llama, the same graph).
IMPORTS: dict[str, ArchSpec] = {}
for _row in _ROWS:
    IMPORTS.setdefault(_row.gguf_name, _row)

# model_type (a text config's, or the multimodal config holding it) -> row
_BY_MODEL_TYPE: dict[str, ArchSpec] = {row.model_type: row for row in _ROWS}
_BY_MODEL_TYPE.update({row.composite[0]: row for row in _ROWS if row.composite})


def by_model_type(model_type: str) -> ArchSpec | None:
    """The row of a config's ``model_type`` (``gemma3`` and ``gemma3_text`` alike), or None."""
    return _BY_MODEL_TYPE.get(model_type)


def by_hf_arch(hf_arch: str) -> ArchSpec | None:
    """The row exporting config.json's ``architectures[0]``, or None."""
    return next((row for row in ARCHS.values() if hf_arch in row.hf_archs), None)


def hf_defaults() -> dict[str, dict[str, Any]]:
    """Text model type -> transformers' config class defaults (what hf_config fills in)."""
    return {row.model_type: row.hf_defaults for row in _ROWS}
