"""config.json -> :class:`HParams` without transformers, for the model types we export.

transformers 5 builds every config class through ``configuration_utils``, which imports
torch: about 3 s of a GGUF export's start on a 2-CPU host, for a handful of keys. For the
model types in :data:`DEFAULTS` this module gives what ``AutoConfig`` gives for the keys
the exporter reads (:data:`READ_KEYS`): the file's values over the config class's
defaults, the values its ``__post_init__`` derives (head_dim, KV heads, layer types,
Qwen's sliding window), and the legacy ``rope_theta``/``rope_scaling`` moved into
``rope_parameters`` the way transformers 5 does it (``modeling_rope_utils``'s
``convert_rope_params_to_dict`` and ``standardize_rope_params``, and the Gemma 3 and
Phi-3 overrides). tests/test_hf_config.py holds both paths equal, key by key. Any other
model type gives None: the caller uses ``AutoConfig``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.archs import ARCHS, HParams, hf_defaults
from common.errors import UserError

# The config keys common/export reads (HParams properties, spec params, rope, extra tensors);
# tests/test_hf_config.py checks common/archs reads no other.
READ_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
             "sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
             "final_logit_softcapping", "original_max_position_embeddings", "rope_parameters", "rope_theta")

# Text model type -> transformers' config class defaults, from the architecture table's rows.
DEFAULTS: dict[str, dict[str, Any]] = hf_defaults()
# model type -> (text key, text type, tie default) of the multimodal configs holding a text one
COMPOSITE = {row.composite[0]: (row.composite[1], row.model_type, row.composite[2])
             for row in ARCHS.values() if row.composite}
# Keys under which get_text_config() would find a nested text config: not a plain text config, so AutoConfig.
_NESTED = ("text_config", "decoder", "generator", "text_encoder")
_LEGACY_LAYER_TYPES = {"attention": "full_attention", "mamba": "linear_attention"}  # configuration_utils' remap
# rope type -> keys transformers requires (validate_rope raises KeyError without them)
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
                  "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
                  "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                             "rope_theta")}
_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings")
_INTS = ("num_key_value_heads", "head_dim", "sliding_window", "query_pre_attn_scalar", "max_window_layers",
         "original_max_position_embeddings", "sliding_window_pattern")
_FLOATS = ("rms_norm_eps", "attn_logit_softcapping", "final_logit_softcapping")
_DIVISIBLE_HEADS = ("llama", "gemma2", "gemma3_text")  # their validate_architecture: hidden_size % heads == 0


def read_hparams(model_dir: str | Path):
    """The :class:`HParams` of ``model_dir/config.json``, or None when its model type is not in
    :data:`DEFAULTS` (nor a composite of one) or the file cannot be parsed: AutoConfig then decides."""
    path = Path(model_dir) / "config.json"
    try:
        top = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(top, dict):
        return None
    model_type, tie_default = top.get("model_type"), None
    text = top
    if model_type in COMPOSITE:
        key, model_type, tie_default = COMPOSITE[model_type]
        text = top.get(key) if top.get(key) is not None else {}
        if not isinstance(text, dict) or text.get("model_type", model_type) != model_type:
            return None
    if model_type not in DEFAULTS or any(k in text for k in _NESTED):
        return None
    cfg = _normalise(dict(text), model_type, path)
    archs = top.get("architectures") or text.get("architectures") or []
    if text is not top:  # the composite's own flag (load_hparams_transformers reads the top config's)
        cfg["tie_word_embeddings"] = bool(top.get("tie_word_embeddings", tie_default))
    return HParams(cfg, archs[0] if archs else "", model_type)


def _normalise(given: dict[str, Any], model_type: str, path: Path) -> dict[str, Any]:
    """The class defaults under the file's values, then what the config class's ``__post_init__`` derives."""
    cfg = {**DEFAULTS[model_type], **given, "model_type": model_type}
    _check_types(cfg, path)
    heads = cfg["num_attention_heads"]
    if model_type in ("llama", "mistral") and cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // heads
    if cfg.get("num_key_value_heads") is None and model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        cfg["num_key_value_heads"] = heads
    if model_type in ("qwen2", "qwen3"):
        cfg["sliding_window"] = cfg["sliding_window"] if cfg["use_sliding_window"] else None
        if cfg["layer_types"] is None:
            cfg["layer_types"] = ["sliding_attention" if cfg["sliding_window"] is not None
                                  and i >= cfg["max_window_layers"] else "full_attention"
                                  for i in range(cfg["num_hidden_layers"])]
    elif model_type == "gemma2" and cfg["layer_types"] is None:
        cfg["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                              for i in range(cfg["num_hidden_layers"])]
    elif model_type == "gemma3_text":
        if cfg["use_bidirectional_attention"] and cfg["sliding_window"] is not None:
            # __post_init__ makes the window w // 2 + 1; to_dict() gives back (that - 1) * 2
            cfg["sliding_window"] = cfg["sliding_window"] // 2 * 2
        if cfg["layer_types"] is None:
            every = cfg.get("sliding_window_pattern", 6)
            cfg["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention"
                                  for i in range(cfg["num_hidden_layers"])]
    # The layer types that may key a nested rope_parameters: only a class field's (where DEFAULTS has
    # the key); a file's layer_types of another class is set as an attribute after the rope step.
    labels = (cfg["layer_types"] or ()) if "layer_types" in DEFAULTS[model_type] else ()
    if model_type == "gemma3_text":
        rope = _gemma3_rope(cfg, path)
    elif model_type == "phi3":
        rope = _phi3_rope(cfg)
    else:
        rope = _generic_rope(cfg, labels)
    cfg["rope_parameters"] = _standardise(rope, cfg, labels, keep_original=model_type == "phi3")
    if model_type == "phi3" and rope.get("rope_type") in ("su", "yarn"):
        rope["rope_type"] = "longrope"
    _check_rope(rope, labels, cfg, path)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [_LEGACY_LAYER_TYPES.get(t, t) for t in cfg["layer_types"]]
        if len(cfg["layer_types"]) != cfg["num_hidden_layers"]:  # transformers' validate_layer_type
            raise UserError(f"{path}: cannot read the model config",
                            [f"'layer_types' has {len(cfg['layer_types'])} entries but 'num_hidden_layers' is "
                             f"{cfg['num_hidden_layers']}"])
    return cfg


def _generic_rope(cfg: dict[str, Any], labels) -> dict[str, Any]:
    """``convert_rope_params_to_dict``: legacy ``rope_scaling`` wins, ``rope_theta`` and
    ``partial_rotary_factor`` move into each parameter dict (popped from the config)."""
    scaling = cfg.pop("rope_scaling", None)
    rope = scaling or cfg.get("rope_parameters")
    rope = rope if rope is not None else {}
    theta = cfg.pop("rope_theta", 10000.0)
    partial = cfg.pop("partial_rotary_factor", None)
    nested = [rope[k] for k in rope if k in labels]
    for params in nested or [rope]:
        if params is None:
            continue
        params.setdefault("rope_theta", theta)
        if partial is not None:
            params.setdefault("partial_rotary_factor", partial)
    return rope


def _gemma3_rope(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Gemma 3: one parameter dict per layer type; legacy scaling applies to the full-attention layers."""
    scaling = cfg.pop("rope_scaling", None)
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope = {"sliding_attention": {"rope_type": "default"}, "full_attention": {"rope_type": "default"}}
    if scaling is not None:
        if not isinstance(rope.get("full_attention"), dict):
            raise UserError(f"{path}: 'rope_scaling' given but 'rope_parameters' has no 'full_attention' entry")
        rope["full_attention"].update(scaling)
    if rope.get("full_attention") is None:
        rope["full_attention"] = {"rope_type": "default"}
    rope["full_attention"].setdefault("rope_theta", cfg.pop("rope_theta", 1_000_000.0))
    if rope.get("sliding_attention") is None:
        rope["sliding_attention"] = {"rope_type": "default"}
    rope["sliding_attention"].setdefault("rope_theta", cfg.pop("rope_local_base_freq", 10000.0))
    return rope


def _phi3_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """Phi-3: partial_rotary_factor (default 1.0) always in the parameters; "su"/"yarn" become "longrope" (after)."""
    scaling = cfg.pop("rope_scaling", None)
    rope = scaling or cfg.get("rope_parameters")
    rope = rope if rope is not None else {}
    rope.setdefault("rope_theta", cfg.pop("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return rope


def _standardise(rope: dict[str, Any], cfg: dict[str, Any], labels, *, keep_original: bool) -> dict[str, Any]:
    """``standardize_rope_params``: a rope_type in each dict, and the pre-scaling context length
    for the types that use it (Phi-3's own ``original_max_position_embeddings`` field wins)."""
    nested = [k for k in rope if k in labels]
    for params in [rope[k] for k in nested] if nested else [rope]:
        if params is None:
            continue
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", None)  # transformers: the config's rope_theta attribute, never set here
        if params["rope_type"] in ("llama3", "yarn", "longrope"):
            if keep_original and not nested:
                params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
            else:
                params.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return rope


def _check_rope(rope: dict[str, Any], labels, cfg: dict[str, Any], path: Path) -> None:
    """``validate_rope``: the keys each rope type needs (transformers raises without them)."""
    nested = [k for k in rope if k in labels]
    problems = []
    for where, params in ([(f"rope_parameters.{k}", rope[k]) for k in nested] if nested else [("rope_parameters", rope)]):
        if params is None:
            continue
        kind = params["rope_type"]
        missing = [k for k in _ROPE_REQUIRED.get(kind, ()) if k not in params]
        if missing:
            problems.append(f"{where}: rope type {kind!r} needs {', '.join(missing)}")
        head_dim = cfg.get("head_dim")
        if isinstance(head_dim, int) and head_dim > 4 and head_dim % 2 and \
                int(head_dim * params.get("partial_rotary_factor", 1.0)) == head_dim:
            problems.append(f"{where}: RoPE needs an even rotary dimension, head_dim is {head_dim}")
    if problems:
        raise UserError(f"{path}: cannot read the model config", problems)


def _check_types(cfg: dict[str, Any], path: Path) -> None:
    """The numbers read are numbers (transformers' strict configs raise otherwise), heads > 0."""
    problems = []
    required = _REQUIRED_INTS + tuple(k for k in ("max_window_layers",) if k in DEFAULTS[cfg["model_type"]])
    for key in required + _INTS:
        value = cfg.get(key)
        if (value is None and key in required) or (value is not None and (isinstance(value, bool)
                                                                           or not isinstance(value, int))):
            problems.append(f"{key!r}: expected an integer, got {value!r}")
    for key in _FLOATS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{key!r}: expected a number, got {value!r}")
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if isinstance(heads, int) and heads <= 0:
        problems.append(f"'num_attention_heads': expected > 0, got {heads}")
    elif isinstance(heads, int) and isinstance(hidden, int) and cfg["model_type"] in _DIVISIBLE_HEADS and hidden % heads:
        problems.append(f"'hidden_size' {hidden} is not a multiple of 'num_attention_heads' {heads}")
    if not isinstance(cfg["tie_word_embeddings"], bool):
        problems.append(f"'tie_word_embeddings': expected true or false, got {cfg['tie_word_embeddings']!r}")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            problems.append(f"{key!r}: expected an object, got {cfg[key]!r}")
    types = cfg.get("layer_types")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
        problems.append(f"'layer_types': expected a list of strings, got {types!r}")
    if problems:
        raise UserError(f"{path}: cannot read the model config", problems)
