"""GGUF metadata both ways: the per-architecture writers export uses (HF config -> GGUF
keys and llama.cpp-only tensors) and their inverses GGUF import uses (GGUF keys ->
config.json). The rows of :mod:`common.archs.table` name one of each. The keys follow
llama.cpp's ``convert_hf_to_gguf.py``; the code is ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from common.archs.spec import HParams
from common.errors import UserError

# ---------------------------------------------------------------------------
# metadata writers


def _common(w: gguf.GGUFWriter, hp: HParams) -> None:
    w.add_block_count(hp.n_layers)
    w.add_context_length(int(hp["max_position_embeddings"]))
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-6)))
    if hp.get("head_dim") is not None:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)


def _rope_scaling(w: gguf.GGUFWriter, hp: HParams, allowed: tuple[str, ...] = ("linear", "yarn", "llama3")) -> None:
    rope = hp.rope()
    w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = str(rope.get("rope_type") or "default").lower()
    if kind == "default":
        return
    if kind not in allowed:
        raise UserError(f"config.json: rope type {kind!r} is not supported for {hp.hf_arch} export "
                        f"(supported: {', '.join(allowed)})")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                     hp.get("original_max_position_embeddings"))))
    # llama3: expressed by the rope_freqs tensor (see llama3_rope_freqs), no scaling type


def llama_params(w: gguf.GGUFWriter, hp: HParams) -> None:
    _common(w, hp)
    w.add_vocab_size(int(hp["vocab_size"]))
    w.add_rope_dimension_count(hp.head_dim)
    _rope_scaling(w, hp)


def qwen_params(w: gguf.GGUFWriter, hp: HParams) -> None:
    _common(w, hp)
    _rope_scaling(w, hp, allowed=("linear", "yarn"))


def _check_swa_layout(hp: HParams, is_sliding: Callable[[int], bool], rule: str) -> None:
    """llama.cpp fixes the sliding/full layer layout per architecture; refuse a model that differs."""
    types = hp.get("layer_types")
    if not types:
        return
    bad = [i for i, t in enumerate(types) if (t == "sliding_attention") != is_sliding(i)]
    if bad:
        raise UserError(f"config.json: layer_types {types} differ from llama.cpp's {hp.hf_arch} layout ({rule}); "
                        f"layers {bad} would attend differently in llama.cpp")


def _head_dim_keys(w: gguf.GGUFWriter, hp: HParams) -> None:
    if hp.get("head_dim") is None:  # _common wrote them otherwise; Gemma always needs them
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)


def gemma2_params(w: gguf.GGUFWriter, hp: HParams) -> None:
    _common(w, hp)
    _head_dim_keys(w, hp)
    w.add_rope_freq_base(float(hp.rope()["rope_theta"]))
    w.add_attn_logit_softcapping(float(hp.get("attn_logit_softcapping", 50.0)))
    w.add_final_logit_softcapping(float(hp.get("final_logit_softcapping", 30.0)))
    w.add_sliding_window(int(hp["sliding_window"]))
    _check_swa_layout(hp, lambda i: i % 2 == 0, "even layers sliding")
    if int(hp.get("query_pre_attn_scalar", hp.head_dim)) != hp.head_dim:
        # llama.cpp scales queries by 1/sqrt(head_dim) (27B: hidden/heads); transformers uses query_pre_attn_scalar
        if int(hp["query_pre_attn_scalar"]) != int(hp["hidden_size"]) // hp.n_head:
            raise UserError(f"config.json: query_pre_attn_scalar {hp['query_pre_attn_scalar']} is not supported by llama.cpp")


def gemma3_params(w: gguf.GGUFWriter, hp: HParams) -> None:
    _common(w, hp)
    _head_dim_keys(w, hp)
    full, local = hp.rope("full_attention"), hp.rope("sliding_attention")
    w.add_rope_freq_base(float(full["rope_theta"]))  # global layers; llama.cpp uses 10000 for local ones
    if float(local["rope_theta"]) != 10000.0:
        raise UserError(f"config.json: sliding-layer rope_theta {local['rope_theta']} != 10000, which llama.cpp assumes for Gemma 3")
    if str(full.get("rope_type", "default")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    elif str(full.get("rope_type", "default")) != "default":
        raise UserError(f"config.json: Gemma 3 rope type {full.get('rope_type')!r} is not supported")
    if hp.get("attn_logit_softcapping") is not None:
        raise UserError("config.json: Gemma 3 with attn_logit_softcapping is not supported by llama.cpp")
    if hp.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
    w.add_sliding_window(int(hp["sliding_window"]))
    _check_swa_layout(hp, lambda i: (i + 1) % 6 != 0, "5 sliding layers, then 1 full")


def phi3_params(w: gguf.GGUFWriter, hp: HParams) -> None:
    rope = hp.rope()
    n_embd, n_head = int(hp["hidden_size"]), hp.n_head
    w.add_block_count(hp.n_layers)
    w.add_context_length(int(hp["max_position_embeddings"]))
    w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                 hp.get("original_max_position_embeddings", hp["max_position_embeddings"]))))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
    w.add_rope_dimension_count(int(float(rope.get("partial_rotary_factor", 1.0)) * n_embd) // n_head)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_sliding_window(int(hp.get("sliding_window") or 0))  # 0: no sliding window (llama.cpp's Phi-4 rule)
    kind = str(rope.get("rope_type", "default")).lower()
    if kind in ("longrope", "su") and rope.get("long_factor"):
        scale = int(hp["max_position_embeddings"]) / int(rope["original_max_position_embeddings"])
        w.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(int(rope["original_max_position_embeddings"]))) if scale > 1 else 1.0)
    elif kind != "default":
        raise UserError(f"config.json: Phi-3 rope type {kind!r} is not supported")


# ---------------------------------------------------------------------------
# extra tensors


def llama3_rope_freqs(hp: HParams) -> list[tuple[str, np.ndarray]]:
    """Llama 3.1+ rope scaling as llama.cpp wants it: a per-frequency factor tensor."""
    rope = hp.rope()
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return []
    base, dim = float(rope["rope_theta"]), hp.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", hp.get("original_max_position_embeddings", 8192)))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.array(factors, dtype=np.float32))]


def phi3_rope_factors(hp: HParams) -> list[tuple[str, np.ndarray]]:
    rope = hp.rope()
    long_f, short_f = rope.get("long_factor"), rope.get("short_factor")
    if not long_f:
        return []
    rope_dims = int(float(rope.get("partial_rotary_factor", 1.0)) * int(hp["hidden_size"])) // hp.n_head
    if not short_f or len(long_f) != len(short_f) or len(long_f) != rope_dims // 2:
        raise UserError(f"config.json: rope long/short factors must both have {rope_dims // 2} entries")
    return [("rope_factors_long.weight", np.array(long_f, dtype=np.float32)),
            ("rope_factors_short.weight", np.array(short_f, dtype=np.float32))]


# ---------------------------------------------------------------------------
# GGUF metadata -> config.json (import)


class Meta:
    """GGUF metadata read through gguf's ``{arch}`` key templates."""

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


K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
ReadTensor = Callable[[str], np.ndarray]


def llama_config(cfg: dict[str, Any], m: Meta, tensors: dict[str, tuple[int, ...]], read: ReadTensor) -> None:
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
               attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors)


def qwen2_config(cfg: dict[str, Any], m: Meta, tensors: dict[str, tuple[int, ...]], read: ReadTensor) -> None:
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", use_sliding_window=False)


def qwen3_config(cfg: dict[str, Any], m: Meta, tensors: dict[str, tuple[int, ...]], read: ReadTensor) -> None:
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
               attention_bias="blk.0.attn_q.bias" in tensors)


def _gemma_config(cfg: dict[str, Any], m: Meta) -> None:
    # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B models, else 1/sqrt(head_dim)
    big = cfg["num_hidden_layers"] in (46, 62)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    cfg.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False,
               query_pre_attn_scalar=hidden // heads if big else cfg["head_dim"],
               sliding_window=int(m.get(A.SLIDING_WINDOW, 4096)), tie_word_embeddings=True)


def gemma2_config(cfg: dict[str, Any], m: Meta, tensors: dict[str, tuple[int, ...]], read: ReadTensor) -> None:
    _gemma_config(cfg, m)
    cfg.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2",
               attn_logit_softcapping=m.get(K.ATTN_LOGIT_SOFTCAPPING),
               final_logit_softcapping=m.get(K.FINAL_LOGIT_SOFTCAPPING))


def gemma3_config(cfg: dict[str, Any], m: Meta, tensors: dict[str, tuple[int, ...]], read: ReadTensor) -> None:
    _gemma_config(cfg, m)
    cfg.update(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
               rope_local_base_freq=10000.0,  # llama.cpp's fixed base for Gemma 3's sliding layers
               sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None)


def phi3_config(cfg: dict[str, Any], m: Meta, tensors: dict[str, tuple[int, ...]], read: ReadTensor) -> None:
    window, orig_ctx = m.get(A.SLIDING_WINDOW), m.get(R.SCALING_ORIG_CTX_LEN)
    cfg.update(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_act="silu",
               sliding_window=int(window) if window else None)  # 0 means none
    if orig_ctx:
        cfg["original_max_position_embeddings"] = int(orig_ctx)
    rot = m.get(R.DIMENSION_COUNT)
    if rot and int(rot) != cfg["head_dim"]:
        cfg["partial_rotary_factor"] = int(rot) / cfg["head_dim"]
    if "rope_factors_long.weight" in tensors:
        cfg["rope_scaling"] = {"type": "longrope",
                               "long_factor": read("rope_factors_long.weight").tolist(),
                               "short_factor": read("rope_factors_short.weight").tolist()}
        cfg["original_max_position_embeddings"] = int(orig_ctx or 4096)
