"""The tokenizer class found without AutoTokenizer (common.models.hf_tokenizer) is AutoTokenizer's:
the tables equal transformers' own, the choice agrees for every model type and declared class,
and the tokenizers loaded for the tiny models and the embedded default equal AutoTokenizer's."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from common.archs import ARCHS
from common.models import hf_tokenizer, load_tokenizer

pytestmark = pytest.mark.torch  # the reference, transformers' tokenization_auto, imports torch
DECLARED = ["TokenizersBackend", "PreTrainedTokenizerFast", "PreTrainedTokenizer", "GPT2Tokenizer",
            "LlamaTokenizer", "LlamaTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast", "GemmaTokenizerFast"]
TEXTS = ["set a timer for ten minutes", " leading space, then\n\ttabs and émojis 🚀", "<|im_start|>user\nhi<|im_end|>\n",
         '{"intent": "play_music"}', ""]


def test_class_table_is_tokenizer_class_from_name():
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    for name in hf_tokenizer.CLASSES:
        want = tokenizer_class_from_name(name)
        if want.__name__ == "PythonBackend":  # AutoTokenizer loads the slow generic name as the fast backend
            want = TokenizersBackend
        module, attr = hf_tokenizer.CLASSES[name]
        assert getattr(importlib.import_module(module), attr) is want, name


def test_model_type_table_is_autotokenizers():
    from transformers.models.auto import tokenization_auto as ta

    for model_type, (registered, hub_is_wrong) in hf_tokenizer.MODEL_TYPES.items():
        want = ta.TOKENIZER_MAPPING_NAMES.get(model_type)
        assert (want.removesuffix("Fast") if want else None) == registered, model_type
        assert (model_type in ta.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) is hub_is_wrong, model_type
    for pattern in ta.MODEL_IDS_TO_TOKENIZERS_BACKEND:  # why an absolute path is never one of them
        assert not pattern.startswith(("/", "*", "?", "[")), pattern


@pytest.mark.parametrize("byte_level", [True, False])
@pytest.mark.parametrize("model_type", sorted(hf_tokenizer.MODEL_TYPES))
def test_choice_equals_autotokenizers(tmp_path, monkeypatch, model_type, byte_level):
    """For each declared class: the class AutoTokenizer.from_pretrained instantiates (its loading stubbed)."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "from_pretrained", classmethod(lambda cls, *a, **k: cls))
    decoder = {"type": "ByteLevel"} if byte_level else {"type": "Metaspace", "replacement": "\u2581"}
    for declared in DECLARED:
        d = tmp_path / f"{declared}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": declared}))
        (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "decoder": decoder}))
        want = AutoTokenizer.from_pretrained(str(d))
        assert hf_tokenizer.tokenizer_class(d) is want, (model_type, declared, byte_level)


def test_undecided_cases_are_left_to_autotokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert hf_tokenizer.tokenizer_class_name(tmp_path) == "LlamaTokenizer"
    assert hf_tokenizer.tokenizer_class_name(Path("relative/dir")) is None
    for tok_cfg, cfg in (({"tokenizer_class": "BertTokenizer"}, {"model_type": "llama"}),
                         ({"tokenizer_class": "LlamaTokenizer"}, {"model_type": "bert"}),
                         ({"tokenizer_class": "LlamaTokenizer", "auto_map": {"AutoTokenizer": ["x.Y", None]}},
                          {"model_type": "llama"}),
                         ({}, {"model_type": "llama"})):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        assert hf_tokenizer.tokenizer_class_name(tmp_path) is None, (tok_cfg, cfg)


def assert_same_tokenizer(model_dir: Path) -> None:
    """load_tokenizer (the fast path) and AutoTokenizer give equal tokenizers."""
    from transformers import AutoTokenizer

    assert hf_tokenizer.tokenizer_class(model_dir) is not None, "the fast path was not taken"
    mine, ref = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    assert type(mine) is type(ref)
    assert mine.get_vocab() == ref.get_vocab()
    assert {i: str(t) for i, t in mine.added_tokens_decoder.items()} == \
        {i: str(t) for i, t in ref.added_tokens_decoder.items()}
    assert mine.all_special_ids == ref.all_special_ids
    for kind in ("bos", "eos", "unk", "pad"):
        assert getattr(mine, f"{kind}_token_id") == getattr(ref, f"{kind}_token_id"), kind
    assert mine.chat_template == ref.chat_template and mine.chat_template
    for text in TEXTS:
        for special in (True, False):
            assert mine.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_model_tokenizers_equal_autotokenizers(tmp_path, arch):
    from tiny import make_config, make_tokenizer

    tokenizer = make_tokenizer(tmp_path)
    make_config(arch, tokenizer).save_pretrained(tmp_path)
    assert_same_tokenizer(tmp_path)


@pytest.mark.slow
def test_default_model_tokenizer_equals_autotokenizers(default_model):
    assert_same_tokenizer(default_model.path)
