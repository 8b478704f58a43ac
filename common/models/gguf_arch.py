"""Per-architecture knowledge for turning a GGUF back into a Hugging Face model.

Three things per architecture: the ``config.json`` its metadata allows, the Hugging Face
name of each tensor (found by running transformers' names through ``gguf.TensorNameMap``,
the table llama.cpp's converter uses, so the inverse is exact), and the undoing of the
converter's edits to some weights: llama's Q/K rows were permuted for llama.cpp's rope
layout, Gemma's norm weights were stored as ``1 + w``.

Supported: llama (also Mistral and SmolLM2, which llama.cpp writes as "llama"), qwen2,
qwen3, gemma2, gemma3 (text), phi3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from common.errors import UserError

# Hugging Face tensor names (without .weight/.bias) in each architecture's decoder layer.
_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_LLAMA = ["input_layernorm", "post_attention_layernorm", *_ATTN, *_MLP]
_GEMMA = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm", *_ATTN, *_MLP]
_QK_NORM = ["self_attn.q_norm", "self_attn.k_norm"]
LAYER_TENSORS: dict[str, list[str]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA + _QK_NORM,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA + _QK_NORM,
    "phi3": ["input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
             "mlp.gate_up_proj", "mlp.down_proj"],
}
GLOBAL_TENSORS = ["model.embed_tokens", "model.norm", "lm_head"]
# GGUF tensors with no Hugging Face weight: llama.cpp-only rope tables, handled in the config.
CONFIG_ONLY_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

SUPPORTED = tuple(LAYER_TENSORS)


def tensor_names(arch: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face tensor name for ``arch`` with ``n_layers`` blocks."""
    import gguf

    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    tmap = gguf.TensorNameMap(model_arch, n_layers)
    hf_names = list(GLOBAL_TENSORS)
    for bid in range(n_layers):
        hf_names += [f"model.layers.{bid}.{name}" for name in LAYER_TENSORS[arch]]
    out: dict[str, str] = {}
    for hf in hf_names:
        gg = tmap.get_name(hf)
        if gg is None:  # a tensor this architecture lacks in llama.cpp (gemma2 has no output.weight)
            continue
        for suffix in (".weight", ".bias"):
            out[gg + suffix] = hf + suffix
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's LlamaModel.permute (rows grouped per head as pairs -> halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weight_fix(arch: str, config: dict[str, Any]) -> Callable[[str, np.ndarray], np.ndarray]:
    """The function that undoes the converter's edit of one tensor (by its HF name)."""
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    def fix(hf_name: str, w: np.ndarray) -> np.ndarray:
        if arch == "llama":
            if ".q_proj." in hf_name:
                return unpermute(w, n_head)
            if ".k_proj." in hf_name:
                return unpermute(w, n_kv)
        if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            return w - np.float32(1.0)  # HF Gemma's RMSNorm multiplies by (1 + w); the GGUF stores 1 + w
        return w

    return fix


# ---------------------------------------------------------------------------
# config.json


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


class _Meta:
    def __init__(self, meta: dict[str, Any], arch: str):
        self.meta, self.arch = meta, arch

    def get(self, template: str, default: Any = None) -> Any:
        key = template.format(arch=self.arch)
        value = self.meta.get(key, default)
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv): only uniform ones are supported
            if len(set(value)) != 1:
                raise UserError(f"GGUF: {key} differs between layers ({sorted(set(value))}); not supported")
            value = value[0]
        return value

    def need(self, template: str) -> Any:
        value = self.get(template)
        if value is None:
            raise UserError(f"GGUF: metadata key {template.format(arch=self.arch)!r} is missing")
        return value


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
    import gguf

    if arch not in SUPPORTED:
        raise UserError(f"GGUF: architecture {arch!r} cannot be imported",
                        [f"supported: {', '.join(SUPPORTED)}",
                         "use the model's original Hugging Face repository instead"])
    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    m = _Meta(meta, arch)
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
    bias = "blk.0.attn_q.bias" in tensors

    if arch == "llama":
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                   attention_bias=bias, mlp_bias="blk.0.ffn_up.bias" in tensors)
    elif arch == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                   use_sliding_window=False)
    elif arch == "qwen3":
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", attention_bias=bias)
    elif arch in ("gemma2", "gemma3"):
        # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B models, else 1/sqrt(head_dim)
        big = n_layers in (46, 62)
        cfg.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False,
                   query_pre_attn_scalar=hidden // heads if big else head_dim,
                   sliding_window=int(m.get(A.SLIDING_WINDOW, 4096)), tie_word_embeddings=True)
        if arch == "gemma2":
            cfg.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                       attn_logit_softcapping=m.get(K.ATTN_LOGIT_SOFTCAPPING),
                       final_logit_softcapping=m.get(K.FINAL_LOGIT_SOFTCAPPING))
        else:
            cfg.update(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                       rope_local_base_freq=10000.0,  # llama.cpp's fixed base for Gemma 3's sliding layers
                       sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None)
    elif arch == "phi3":
        window = m.get(A.SLIDING_WINDOW)
        cfg.update(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_act="silu",
                   sliding_window=int(window) if window else None)  # 0 means none
        if orig_ctx:
            cfg["original_max_position_embeddings"] = int(orig_ctx)
        rot = m.get(R.DIMENSION_COUNT)
        if rot and int(rot) != head_dim:
            cfg["partial_rotary_factor"] = int(rot) / head_dim
        if "rope_factors_long.weight" in tensors:
            cfg["rope_scaling"] = {"type": "longrope",
                                   "long_factor": read_tensor("rope_factors_long.weight").tolist(),
                                   "short_factor": read_tensor("rope_factors_short.weight").tolist()}
            cfg["original_max_position_embeddings"] = int(orig_ctx or 4096)
    return cfg


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the token ids generation needs, nothing invented."""
    out = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return out
