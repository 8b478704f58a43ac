"""config.json read without transformers (common.export.hf_config) equals transformers' AutoConfig
for every key the exporter reads: tiny configs, configs with the defaulted keys left out, legacy
rope_theta/rope_scaling, Gemma 3 inside a multimodal config; both refuse the same broken configs."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

from common.errors import UserError
from common.export import hf_config
from common.export.arch import ARCHS, load_hparams, load_hparams_transformers, spec_for

pytestmark = pytest.mark.torch  # the reference, transformers' config classes, imports torch
TINY_ARCHS = sorted(ARCHS)
PROPERTIES = ("n_layers", "n_head", "n_head_kv", "head_dim", "hf_arch", "model_type")
LEGACY_ROPE = {  # rope_scaling as older config.json files carry it
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "linear": {"type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn-implicit-context": {"type": "yarn", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "su": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 128},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5] * 8},
    "llama3-incomplete": {"rope_type": "llama3", "factor": 8.0},
}


def tiny_config(arch: str) -> dict:
    """config.json of tests/tiny.py's model of ``arch`` (as make_model saves it)."""
    from tiny import make_config

    class Tok:  # what make_config reads of a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 400

    return make_config(arch, Tok()).to_dict()


def _write(tmp_path: Path, cfg: dict, label: str) -> Path:
    d = tmp_path / re.sub(r"[^a-z0-9_.-]+", "-", label.lower())
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _metadata(hp):
    """What the exporter makes of ``hp``: the GGUF keys and extra tensors, or the UserError."""
    import gguf

    try:
        spec = spec_for(hp)
        w = gguf.GGUFWriter(None, spec.gguf_name)
        spec.params(w, hp)
        extra = [(name, data.tobytes()) for name, data in spec.extra_tensors(hp)]
    except UserError as exc:
        return ("refused", exc.message)
    return {k: (v.value, v.type) for k, v in w.kv_data[0].items()}, extra


def assert_same(model_dir: Path) -> None:
    """Both readers give equal read keys, properties, rope parameters and GGUF metadata, or both refuse."""
    try:
        want = load_hparams_transformers(model_dir)
    except Exception:  # noqa: BLE001 - transformers refuses (its strict validation raises its own types)
        try:
            got = hf_config.read_hparams(model_dir)
        except UserError:
            return
        assert got is not None, "fell back to AutoConfig for a supported model type"
        assert _metadata(got)[0] == "refused", "AutoConfig refuses this config, the exporter would write it"
        return
    got = hf_config.read_hparams(model_dir)
    assert got is not None, "fell back to AutoConfig for a supported model type"
    for key in hf_config.READ_KEYS:
        assert got.cfg.get(key) == want.cfg.get(key), key
    for name in PROPERTIES:
        assert getattr(got, name) == getattr(want, name), name
    for layer_type in ("full_attention", "sliding_attention"):
        assert got.rope(layer_type) == want.rope(layer_type), layer_type
    assert _metadata(got) == _metadata(want)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_configs_read_the_same(tmp_path, arch):
    assert_same(_write(tmp_path, tiny_config(arch), arch))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_defaulted_keys_left_out_read_the_same(tmp_path, arch):
    """transformers' class defaults fill what config.json leaves out, each key alone and all at once."""
    full = tiny_config(arch)
    defaulted = [k for k in hf_config.DEFAULTS[full["model_type"]] if k in full]
    assert defaulted
    for key in defaulted:
        assert_same(_write(tmp_path, {k: v for k, v in full.items() if k != key}, f"{arch}-without-{key}"))
    assert_same(_write(tmp_path, {k: v for k, v in full.items() if k not in defaulted}, f"{arch}-bare"))


@pytest.mark.parametrize("legacy", sorted(LEGACY_ROPE))
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_legacy_rope_scaling_reads_the_same(tmp_path, arch, legacy):
    """rope_theta / rope_scaling / rope_local_base_freq become rope_parameters as transformers 5 makes them
    (or both refuse: a type the architecture does not take, or required keys missing)."""
    cfg = {k: v for k, v in tiny_config(arch).items() if k != "rope_parameters"}
    cfg.update(rope_theta=50000.0, rope_scaling=copy.deepcopy(LEGACY_ROPE[legacy]))
    assert_same(_write(tmp_path, cfg, f"{arch}-{legacy}"))
    cfg.update(rope_local_base_freq=10000.0, original_max_position_embeddings=300)
    assert_same(_write(tmp_path, cfg, f"{arch}-{legacy}-context"))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_legacy_rope_theta_alone_reads_the_same(tmp_path, arch):
    cfg = {k: v for k, v in tiny_config(arch).items() if k != "rope_parameters"}
    assert_same(_write(tmp_path, {**cfg, "rope_theta": 500000.0}, f"{arch}-theta"))
    assert_same(_write(tmp_path, {**cfg, "partial_rotary_factor": 0.5}, f"{arch}-partial"))


def test_variants_read_the_same(tmp_path):
    """Derived values: Qwen's sliding window and layer types, Gemma 3's pattern and bidirectional window,
    rope per layer type, legacy layer type names, an untied Gemma 3 inside a multimodal config."""
    qwen, gemma3, gemma2 = tiny_config("qwen2"), tiny_config("gemma3"), tiny_config("gemma2")
    cases = {
        "qwen-sliding": {**qwen, "use_sliding_window": True, "max_window_layers": 1, "layer_types": None},
        "qwen3-sliding": {**tiny_config("qwen3"), "use_sliding_window": True, "sliding_window": 32},
        "qwen-nested-rope": {**qwen, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0}}},
        "gemma3-pattern": {**gemma3, "layer_types": None, "sliding_window_pattern": 2, "num_hidden_layers": 4},
        "gemma3-bidirectional": {**gemma3, "use_bidirectional_attention": True, "sliding_window": 65},
        "gemma3-no-rope": {k: v for k, v in gemma3.items() if k != "rope_parameters"},
        "gemma2-legacy-layer-names": {**gemma2, "layer_types": ["sliding_attention", "attention"]},
        "mistral-no-window-key": {k: v for k, v in tiny_config("mistral").items() if k != "sliding_window"},
        "llama-tied-null": {**tiny_config("llama"), "tie_word_embeddings": None},
        "llama-head-dim": {**tiny_config("llama"), "head_dim": 32},
        "gemma3-multimodal": {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                              "tie_word_embeddings": False, "text_config": gemma3},
        "gemma3-multimodal-defaults": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3"},
        "phi3-window": {**tiny_config("phi3"), "sliding_window": 2047, "original_max_position_embeddings": 256},
    }
    for label, cfg in cases.items():
        assert_same(_write(tmp_path, cfg, label))


def test_broken_configs_are_user_errors_naming_file_and_key(tmp_path):
    cfg = {**tiny_config("llama"), "num_hidden_layers": "2", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    d = _write(tmp_path, cfg, "broken")
    with pytest.raises(UserError) as exc:
        hf_config.read_hparams(d)
    assert str(d / "config.json") in exc.value.message
    assert any("num_hidden_layers" in p for p in exc.value.problems)
    d2 = _write(tmp_path, {**tiny_config("llama"), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope")
    with pytest.raises(UserError) as exc:
        hf_config.read_hparams(d2)
    assert any("low_freq_factor" in p for p in exc.value.problems)


def test_other_model_types_go_through_autoconfig(tmp_path, monkeypatch):
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4}
    d = _write(tmp_path, cfg, "gpt2")
    assert hf_config.read_hparams(d) is None
    assert load_hparams(d).model_type == "gpt2"
    assert hf_config.read_hparams(tmp_path / "missing") is None


def test_broken_config_of_another_model_type_is_a_user_error(tmp_path):
    # regression: transformers 5 reports a bad field with huggingface_hub's StrictDataclassError (a traceback)
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2, "n_embd": "wide", "n_head": 4}
    d = _write(tmp_path, cfg, "gpt2-broken")
    with pytest.raises(UserError, match="config.json: cannot read the model config"):
        load_hparams(d)


def test_defaults_are_transformers_class_defaults():
    """DEFAULTS holds each config class's own field defaults (a transformers upgrade that changes one fails here)."""
    from transformers import CONFIG_MAPPING

    for model_type, defaults in hf_config.DEFAULTS.items():
        fields = {f.name: f.default for f in dataclasses.fields(CONFIG_MAPPING[model_type])}
        for key, value in defaults.items():
            assert key in fields and fields[key] == value, (model_type, key, fields.get(key), value)
    for model_type, (_, text_type, tie) in hf_config.COMPOSITE.items():
        assert text_type in hf_config.DEFAULTS
        assert CONFIG_MAPPING[model_type]().tie_word_embeddings is tie
    assert set(hf_config.DEFAULTS) == {spec.model_type for spec in ARCHS.values()}


def test_the_exporter_reads_no_other_config_key():
    """Regression guard: a key the exporter starts reading must get its transformers default in hf_config."""
    import common.archs

    source = "".join(p.read_text(encoding="utf-8") for p in Path(common.archs.__file__).parent.glob("*.py"))
    read = set(re.findall(r"""(?:hp|self|self\.cfg)(?:\.get\(|\[)\s*["']([a-z_]+)["']""", source))
    assert read, "the pattern found nothing: update it with common/archs"
    assert read <= set(hf_config.READ_KEYS), read - set(hf_config.READ_KEYS)


def test_tie_default_per_type(tmp_path):
    """An absent tie_word_embeddings is the class default: Gemma ties, Llama does not."""
    for arch, tied in (("llama", False), ("gemma2", True)):
        cfg = {k: v for k, v in tiny_config(arch).items() if k != "tie_word_embeddings"}
        hp = hf_config.read_hparams(_write(tmp_path, cfg, f"{arch}-tie"))
        assert hp.cfg["tie_word_embeddings"] is tied


@pytest.mark.slow
def test_default_model_config_reads_the_same(default_model):
    """The embedded SmolLM2's config.json (legacy rope_theta) as AutoConfig reads it."""
    assert_same(default_model.path)
