"""What one architecture row says, and what follows from it.

:class:`ArchSpec` declares facts (the GGUF name, transformers' config defaults, the layer
layout, the weight edits llama.cpp's converter makes); the methods derive from them the
export direction (HF -> GGUF: Q/K row permutation, Gemma's ``norm + 1``), the import
direction (the same edits undone) and the tensor names both ways through
``gguf.TensorNameMap``. The rows are in :mod:`common.archs.table`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved rotary layout (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_rows` (llama.cpp's pairs per head -> HF's halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_QK = (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads"))


@dataclass(frozen=True)
class ArchSpec:
    """Everything the project knows about one Hugging Face architecture."""

    name: str  # our name: the key of ARCHS and of tests/tiny.py's ARCH_CONFIGS
    gguf_name: str  # llama.cpp's general.architecture (gguf.MODEL_ARCH_NAMES value)
    hf_archs: tuple[str, ...]  # config.json "architectures" entries exported through this row
    model_type: str  # the text config's model_type (transformers' config class key)
    hf_defaults: dict[str, Any]  # that config class's defaults of the keys export reads or derives from
    params: Callable[..., None]  # writes the GGUF metadata: (GGUFWriter, HParams)
    import_config: Callable[..., None]  # the inverse: fills config.json's arch keys from GGUF metadata
    extra_tensors: Callable[[HParams], list[tuple[str, np.ndarray]]] = lambda hp: []
    # (top model_type, key of its text config, tie default) for a multimodal config holding this one
    composite: tuple[str, str, bool] | None = None
    # weight edits of llama.cpp's converter; forward and inverse both derive from these
    permute_qk: bool = False  # llama-family: Q/K rows re-ordered for llama.cpp's rope
    norm_shift: float = 0.0  # Gemma: RMSNorm computes x * (1 + w); llama.cpp computes x * w
    always_tied: bool = False  # Gemma: the output projection is the embedding; lm_head is never written
    needs_output: bool = False  # llama.cpp loads output.weight unconditionally: write the tied embedding
    # layer layout: HF tensor names, parameter count and LoRA shapes derive from these
    sandwich_norms: bool = False  # Gemma: pre/post feed-forward norms besides the usual two
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3, Gemma 3)
    qkv_bias: bool = False  # q/k/v projections always carry biases (Qwen2)
    fused: bool = False  # Phi-3: one qkv_proj and one gate_up_proj
    # tokenizer: SentencePiece's add_space_prefix for llama.cpp (None: from the tokenizer itself)
    add_space_prefix: bool | None = None
    mlx_model: str = ""  # mlx-lm's module for this model type (mlx_lm.models.<mlx_model>)
    mlx_grouped_mask: bool = False  # that module applies the mask to 5-D grouped-query scores
    notes: tuple[str, ...] = field(default=())

    # -- names -------------------------------------------------------------

    @property
    def gguf_arch(self):
        import gguf  # the package's import is the cost of an export, not of a table lookup

        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.gguf_name)

    def tensor_map(self, n_blocks: int):
        import gguf

        return gguf.get_tensor_name_map(self.gguf_arch, n_blocks)

    def layer_tensors(self) -> list[str]:
        """The Hugging Face tensor names (without .weight/.bias) of one decoder layer."""
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        if self.fused:
            attn, mlp = ["self_attn.qkv_proj", "self_attn.o_proj"], ["mlp.gate_up_proj", "mlp.down_proj"]
        else:
            attn = [f"self_attn.{p}_proj" for p in "qkvo"]
            mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        return norms + attn + mlp + (["self_attn.q_norm", "self_attn.k_norm"] if self.qk_norm else [])

    def gguf_to_hf_names(self, n_layers: int) -> dict[str, str]:
        """GGUF tensor name -> Hugging Face tensor name, through ``gguf.TensorNameMap``."""
        tmap = self.tensor_map(n_layers)
        hf_names = ["model.embed_tokens", "model.norm", "lm_head"]
        for bid in range(n_layers):
            hf_names += [f"model.layers.{bid}.{name}" for name in self.layer_tensors()]
        out: dict[str, str] = {}
        for hf in hf_names:
            gg = tmap.get_name(hf)
            if gg is None:  # a tensor this architecture lacks in llama.cpp (gemma2 has no output.weight)
                continue
            for suffix in (".weight", ".bias"):
                out[gg + suffix] = hf + suffix
        return out

    # -- forward: HF -> GGUF -------------------------------------------------

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
        heads = self._qk_heads(name, {"num_attention_heads": hp.n_head, "num_key_value_heads": hp.n_head_kv})
        return None if heads is None else permute_rows(np.arange(n_rows), heads)

    def transform_values(self, name: str, data: np.ndarray) -> np.ndarray:
        """The element-wise part of :meth:`transform` (Gemma's norm + 1): applies to any row chunk."""
        if self.norm_shift and name.endswith("norm.weight"):
            data = data + np.float32(self.norm_shift)
        return data

    # -- inverse: GGUF -> HF -------------------------------------------------

    def untransform(self, hf_name: str, w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """Undo :meth:`transform` on a tensor read from a GGUF (``hf_name``: its HF name)."""
        heads = self._qk_heads(hf_name, config)
        if heads is not None:
            w = unpermute_rows(w, heads)
        if self.norm_shift and hf_name.endswith("norm.weight"):
            w = w - np.float32(self.norm_shift)  # the GGUF stores 1 + w
        return w

    def _qk_heads(self, name: str, cfg: dict[str, Any]) -> int | None:
        """The head count whose rows :attr:`permute_qk` re-orders in tensor ``name``, or None."""
        if self.permute_qk:
            for proj, key in _QK:
                if name.endswith((f"{proj}.weight", f"{proj}.bias")):
                    return int(cfg[key] or cfg["num_attention_heads"])
        return None
