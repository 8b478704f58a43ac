"""Turning a GGUF back into a Hugging Face model: the generic half.

The architecture's row (:data:`common.archs.IMPORTS`, keyed by ``general.architecture``)
gives the rest: the Hugging Face name of each tensor (transformers' names run through
``gguf.TensorNameMap``, the table llama.cpp's converter uses, so the inverse is exact),
the undoing of the converter's weight edits (derived from the same fields export applies
them from) and the architecture's own config.json keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from common.archs import IMPORTS
from common.archs.gguf_meta import A, K, Meta, R
from common.errors import UserError

# GGUF tensors with no Hugging Face weight: llama.cpp-only rope tables, handled in the config.
CONFIG_ONLY_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

SUPPORTED = tuple(IMPORTS)


def tensor_names(arch: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face tensor name for ``arch`` with ``n_layers`` blocks."""
    return IMPORTS[arch].gguf_to_hf_names(n_layers)


def weight_fix(arch: str, config: dict[str, Any]) -> Callable[[str, np.ndarray], np.ndarray]:
    """The function that undoes the converter's edit of one tensor (by its HF name)."""
    spec = IMPORTS[arch]
    return lambda hf_name, w: spec.untransform(hf_name, w, config)


# ---------------------------------------------------------------------------
# config.json


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _llama3_rope(freqs: np.ndarray, theta: float, head_dim: int, orig_ctx: int | None) -> dict[str, Any]:
    """Recover llama3 rope scaling from the rope_freqs tensor llama.cpp stores instead of it."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    for factor in (8.0, 32.0, 16.0, 4.0):
        for old in ([orig_ctx] if orig_ctx else []) + [8192]:
            low, high = old / 1.0, old / 4.0  # llama3 defaults: low_freq_factor 1, high_freq_factor 4
            smooth = (old / wavelen - 1.0) / (4.0 - 1.0)
            expect = np.where(wavelen < high, 1.0, np.where(wavelen > low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
            if expect.shape == freqs.shape and np.allclose(expect, freqs, rtol=1e-3):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": int(old)}
    raise UserError("GGUF: rope_freqs does not match llama3 rope scaling with known parameters; not supported")


def build_config(arch: str, meta: dict[str, Any], tensors: dict[str, tuple[int, ...]],
                 read_tensor: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """config.json for ``arch`` from GGUF metadata; ``tensors`` maps names to numpy shapes."""
    if arch not in SUPPORTED:
        raise UserError(f"GGUF: architecture {arch!r} cannot be imported",
                        [f"supported: {', '.join(SUPPORTED)}",
                         "use the model's original Hugging Face repository instead"])
    m = Meta(meta, arch)
    hidden, heads = int(m.need(K.EMBEDDING_LENGTH)), int(m.need(A.HEAD_COUNT))
    n_layers = int(m.need(K.BLOCK_COUNT))
    if "token_embd.weight" not in tensors:
        raise UserError("GGUF: tensor 'token_embd.weight' is missing")
    vocab = tensors["token_embd.weight"][0]
    head_dim = int(m.get(A.KEY_LENGTH) or m.get(R.DIMENSION_COUNT) or hidden // heads)
    theta = _f32(m.get(R.FREQ_BASE, 10000.0))
    cfg: dict[str, Any] = {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(m.need(K.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get(A.HEAD_COUNT_KV) or heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(m.get(K.CONTEXT_LENGTH, 4096)),
        "rms_norm_eps": _f32(m.get(A.LAYERNORM_RMS_EPS, 1e-6)),
        "rope_theta": theta,  # top-level, as mlx-lm reads it; transformers 5 turns it into rope_parameters
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int):
            cfg[name] = value
    scaling = m.get(R.SCALING_TYPE)
    factor = m.get(R.SCALING_FACTOR)
    orig_ctx = m.get(R.SCALING_ORIG_CTX_LEN)
    if scaling in ("linear", "yarn") and factor:
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": _f32(factor)}
        if scaling == "yarn" and orig_ctx:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig_ctx)
    if "rope_freqs.weight" in tensors:
        cfg["rope_scaling"] = _llama3_rope(read_tensor("rope_freqs.weight").astype(np.float64), theta,
                                           head_dim, orig_ctx)
    IMPORTS[arch].import_config(cfg, m, tensors, read_tensor)
    return cfg


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the token ids generation needs, nothing invented."""
    out = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return out
