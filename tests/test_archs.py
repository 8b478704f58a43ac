"""The architecture table: every row has a tiny model and a round trip, the inverse weight
transforms undo the forward ones, and every reader of architecture facts reads the rows."""

from __future__ import annotations

import numpy as np
import pytest

from common.archs import ARCHS, IMPORTS, HParams, by_hf_arch, by_model_type
from common.export import hf_config
from common.models import catalog, gguf_arch, memory

CFG = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "intermediate_size": 128}


def _params(test) -> list:
    """The values of ``test``'s parametrize mark on ``arch``."""
    return next(list(m.args[1]) for m in test.pytestmark if m.name == "parametrize" and m.args[0] == "arch")


def test_every_row_has_a_tiny_model_and_a_round_trip_test():
    # guards against a row added without its tiny model or outside the round trip / export tests
    import test_export_gguf
    import test_gguf_import
    from tiny import ARCH_CONFIGS

    assert set(ARCH_CONFIGS) == set(ARCHS), "tests/tiny.py ARCH_CONFIGS needs one entry per row"
    assert set(_params(test_gguf_import.test_every_supported_architecture_round_trips_through_our_exporter)) == set(ARCHS)
    assert set(_params(test_export_gguf.test_arch_exports_and_matches_transformers)) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_inverse_transform_undoes_the_forward_one(arch):
    spec, rng = ARCHS[arch], np.random.default_rng(0)
    hp = HParams(dict(CFG), spec.hf_archs[0], spec.model_type)
    for layer_name in spec.layer_tensors():
        name = f"model.layers.0.{layer_name}.weight"
        w = rng.normal(size=(CFG["num_attention_heads"] * CFG["head_dim"], 8)).astype(np.float32)
        out = spec.transform(name, w, hp)
        back = spec.untransform(name, out, CFG)
        np.testing.assert_allclose(back, w, rtol=0, atol=1e-6, err_msg=name)
        changed = not np.array_equal(out, w)
        expected = (spec.permute_qk and layer_name.endswith(("q_proj", "k_proj"))) or \
            (bool(spec.norm_shift) and layer_name.endswith("norm"))
        assert changed == expected, name


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_layer_tensor_has_a_gguf_name(arch):
    spec = ARCHS[arch]
    names = spec.gguf_to_hf_names(2)
    hf = set(names.values())
    for layer_name in spec.layer_tensors():
        assert f"model.layers.1.{layer_name}.weight" in hf, layer_name
    assert "model.embed_tokens.weight" in hf and "model.norm.weight" in hf


def test_readers_take_their_facts_from_the_rows():
    for name, spec in ARCHS.items():
        assert by_hf_arch(spec.hf_archs[0]) is spec
        assert by_model_type(spec.model_type) is spec
        assert hf_config.DEFAULTS[spec.model_type] is spec.hf_defaults
        assert IMPORTS[spec.gguf_name].gguf_name == spec.gguf_name
        assert gguf_arch.SUPPORTED.count(spec.gguf_name) == 1
        ok, why = catalog.exporter_support({"architectures": [spec.hf_archs[0]]})
        assert ok and spec.gguf_name in why, name
        shape = memory.Shape.from_config({**CFG, "vocab_size": 100, "model_type": spec.model_type})
        assert shape.fused is spec.fused
    assert by_model_type("gemma3") is ARCHS["gemma3"]  # the multimodal config holding gemma3_text
    assert IMPORTS["llama"] is ARCHS["llama"]  # Mistral's GGUF comes back as Llama
    assert catalog.exporter_support({"architectures": ["GPT2LMHeadModel"]})[0] is False
