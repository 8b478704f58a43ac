"""The architecture table: how a Hugging Face causal LM becomes a llama.cpp GGUF.

One :class:`ArchSpec` per supported family says which llama.cpp architecture it is,
which metadata keys it needs, which tensors change on the way (llama's Q/K row
permutation for llama.cpp's rotary layout, Gemma's ``norm + 1``), and which extra
tensors llama.cpp wants (Llama-3 ``rope_freqs``, Phi-3 long-rope factors). Tensor names
are mapped by ``gguf.TensorNameMap``. The keys and transforms follow llama.cpp's
``convert_hf_to_gguf.py``; the code is ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from common.errors import UserError


@dataclass
class HParams:
    """The text config of a model (transformers' normalised view: rope_parameters, defaults)."""

    cfg: dict[str, Any]
    hf_arch: str
    model_type: str

    def get(self, key: str, default: Any = None) -> Any:
        value = self.cfg.get(key)
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        if self.cfg.get(key) is None:
            raise UserError(f"config.json: missing {key!r} for {self.hf_arch}")
        return self.cfg[key]

    @property
    def n_layers(self) -> int:
        return int(self["num_hidden_layers"])

    @property
    def n_head(self) -> int:
        return int(self["num_attention_heads"])

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim") or self["hidden_size"] // self.n_head)

    def rope(self, layer_type: str = "full_attention") -> dict[str, Any]:
        """RoPE parameters (transformers 5 ``rope_parameters``; per layer type for Gemma 3)."""
        params = self.cfg.get("rope_parameters") or {}
        if layer_type in params and isinstance(params[layer_type], dict):
            params = params[layer_type]
        elif "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]
        out = dict(params)
        out.setdefault("rope_theta", self.cfg.get("rope_theta", 10000.0))
        out.setdefault("rope_type", "default")
        return out


def load_hparams(model_dir: str | Path) -> HParams:
    """config.json with transformers' defaults filled and rope normalised.

    Read without transformers for the model types ``hf_config`` knows (transformers imports
    torch for any config class: seconds); through ``AutoConfig`` for any other.
    """
    from common.export import hf_config

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
# tensor transforms


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved rotary layout (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face architecture maps to llama.cpp."""

    name: str  # our name (and the key of ARCHS)
    gguf_arch: gguf.MODEL_ARCH
    hf_archs: tuple[str, ...]
    params: Callable[[gguf.GGUFWriter, HParams], None]
    extra_tensors: Callable[[HParams], list[tuple[str, np.ndarray]]] = lambda hp: []
    permute_qk: bool = False  # llama-family: Q/K rows re-ordered for llama.cpp's rope
    norm_shift: float = 0.0  # Gemma: RMSNorm computes x * (1 + w); llama.cpp computes x * w
    always_tied: bool = False  # Gemma: the output projection is the embedding; lm_head is never written
    needs_output: bool = False  # llama.cpp loads output.weight unconditionally: write the tied embedding
    add_space_prefix: bool | None = None  # SentencePiece: Gemma sets it False
    notes: tuple[str, ...] = field(default=())

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def tensor_map(self, n_blocks: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, n_blocks)

    def transform(self, name: str, data: np.ndarray, hp: HParams) -> np.ndarray:
        """Apply this architecture's tensor changes to an HF tensor (float32) named ``name``."""
        order = self.row_order(name, data.shape[0], hp)
        if order is not None:
            data = data[order]
        return self.transform_values(name, data)

    def row_order(self, name: str, n_rows: int, hp: HParams) -> np.ndarray | None:
        """Output row i is HF row ``order[i]`` (llama's Q/K permutation), or None: rows stay in place.

        Separate from :meth:`transform` so a tensor can be produced a row chunk at a time.
        """
        if self.permute_qk:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                return permute_rows(np.arange(n_rows), hp.n_head)
            if name.endswith(("k_proj.weight", "k_proj.bias")):
                return permute_rows(np.arange(n_rows), hp.n_head_kv)
        return None

    def transform_values(self, name: str, data: np.ndarray) -> np.ndarray:
        """The element-wise part of :meth:`transform` (Gemma's norm + 1): applies to any row chunk."""
        if self.norm_shift and name.endswith("norm.weight"):
            data = data + np.float32(self.norm_shift)
        return data


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, ("LlamaForCausalLM",), llama_params, llama3_rope_freqs,
                      permute_qk=True),
    "mistral": ArchSpec("mistral", gguf.MODEL_ARCH.LLAMA, ("MistralForCausalLM",), llama_params, llama3_rope_freqs,
                        permute_qk=True, notes=("llama.cpp's llama graph ignores Mistral's sliding window",)),
    "qwen2": ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, ("Qwen2ForCausalLM",), qwen_params),
    "qwen3": ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3, ("Qwen3ForCausalLM",), qwen_params),
    "gemma2": ArchSpec("gemma2", gguf.MODEL_ARCH.GEMMA2, ("Gemma2ForCausalLM",), gemma2_params,
                       norm_shift=1.0, always_tied=True, add_space_prefix=False),
    "gemma3": ArchSpec("gemma3", gguf.MODEL_ARCH.GEMMA3, ("Gemma3ForCausalLM",), gemma3_params,
                       norm_shift=1.0, always_tied=True, add_space_prefix=False),
    # Older llama.cpp builds (and so some Ollama releases) require output.weight for phi3.
    "phi3": ArchSpec("phi3", gguf.MODEL_ARCH.PHI3, ("Phi3ForCausalLM",), phi3_params, phi3_rope_factors,
                     needs_output=True),
}


def spec_for(hp: HParams) -> ArchSpec:
    """The ArchSpec for a model's ``architectures[0]``, or a UserError listing what is supported."""
    for spec in ARCHS.values():
        if hp.hf_arch in spec.hf_archs:
            return spec
    supported = ", ".join(a for s in ARCHS.values() for a in s.hf_archs)
    raise UserError(f"architecture {hp.hf_arch or hp.model_type!r} cannot be exported to GGUF yet "
                    f"(supported: {supported})")
