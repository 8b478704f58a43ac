"""GGUF import: a tiny model written as llama.cpp would round-trips to the same weights,
config and tokenizer; crafted or broken files are refused quickly with a clear message."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from common.archs import ARCHS
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PROBES = ["Hello world", "set a timer for 10 minutes", "0123456789 12345", "  two  spaces   three",
          "tabs\tand\nnewlines\n\n", "emoji 😀🎉!", "中文字符 日本語", "<|im_start|>user\nhi<|im_end|>\n",
          '{"intent": "get_weather", "slots": {}}', "don't they'll I'M", "", " "]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    from gguf_tiny import write_tiny_gguf

    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_roundtrip_weights_config_and_files(tiny_gguf, tiny_model_dir, home):
    from safetensors.numpy import load_file

    from common.models.gguf_import import import_gguf

    out = import_gguf(tiny_gguf)
    assert out.parent == home / "models" and out.name.startswith("tiny-")
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "gguf_tokenizer.json",
                                               "llm_ft_import.json"}
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    imported = load_file(str(out / "model.safetensors"))
    assert set(imported) == set(original)
    for name, w in original.items():  # F32 in, F32 out: Q/K un-permuted exactly
        np.testing.assert_array_equal(imported[name], w, err_msg=name)
    src, cfg = json.loads((tiny_model_dir / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "vocab_size", "tie_word_embeddings", "model_type", "architectures", "head_dim",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == src[key], key
    assert cfg["rope_theta"] == src["rope_parameters"]["rope_theta"]
    record = json.loads((out / "llm_ft_import.json").read_text())
    assert record["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert record["architecture"] == "llama" and record["source"] == str(tiny_gguf.resolve())


def test_roundtrip_tokenizer(tiny_gguf, tiny_model_dir, home):
    from common.models import load_tokenizer
    from common.models.gguf_import import import_gguf

    out = import_gguf(tiny_gguf)
    ours, theirs = load_tokenizer(out), load_tokenizer(tiny_model_dir)
    for text in PROBES:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours.chat_template == theirs.chat_template
    assert (out / "chat_template.jinja").read_text() == theirs.chat_template
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == \
           (theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["add_bos_token"] is False and tcfg["chat_template"] == theirs.chat_template


def test_import_is_done_once_and_can_be_renamed(tiny_gguf, home):
    from common.models.gguf_import import import_gguf

    first = import_gguf(tiny_gguf)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = import_gguf(tiny_gguf)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert time.perf_counter() - t0 < 2.0
    assert import_gguf(tiny_gguf, name="other") == first  # a name alone does not move an import
    renamed = import_gguf(tiny_gguf, name="my model", rename=True)
    assert renamed.name.startswith("my-model-") and renamed.is_dir() and not first.exists()
    assert json.loads((renamed / "llm_ft_import.json").read_text())["name"] == renamed.name


def test_quantized_tensors_dequantize_to_the_same_values_as_gguf(tiny_model_dir, tmp_path, home):
    import gguf
    from gguf_tiny import permute, write_tiny_gguf
    from safetensors.numpy import load_file

    from common.models.gguf_import import import_gguf

    path = write_tiny_gguf(tiny_model_dir, tmp_path / "q8.gguf", quant="q8_0")
    out = import_gguf(path)
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    imported = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    expect = gguf.quants.dequantize(gguf.quants.quantize(permute(original[name], 4), gguf.GGMLQuantizationType.Q8_0),
                                    gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(permute(imported[name], 4), expect)  # un-permuted after dequantizing
    for key, w in original.items():
        np.testing.assert_allclose(imported[key], w, atol=2e-3, err_msg=key)  # Q8_0: |error| <= scale/2


def test_imported_logits_match_the_original(tiny_gguf, tiny_model_dir, home):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from common.models.gguf_import import import_gguf

    out = import_gguf(tiny_gguf)
    ids = torch.tensor([[1, 5, 9, 30, 77, 120, 3, 2]])
    a = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=1e-6)


def test_import_needs_no_torch(tiny_gguf, tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # as if not installed: import fails, importlib.util.find_spec gives None
        from common.models import resolve_model
        m = resolve_model(sys.argv[1])
        print(m.source, m.path, sys.modules.get("torch", 0) is None)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_gguf)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                                            "LLM_FT_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    source, path, leaked = proc.stdout.split()
    assert source == "gguf" and (Path(path) / "model.safetensors").exists()
    assert leaked == "True"  # the None placeholder: nothing replaced it with the real torch


# ---------------------------------------------------------------------------
# bad files: each refused by the header scan, fast, naming the problem


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


def _tensor(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset)


BAD_FILES = {
    "wrong magic": (b"GGML" + bytes(60), "wrong magic"),
    "old ggjt file": (b"tjgg" + bytes(60), "old GGML/GGJT"),
    "too short": (b"GGUF\x03\x00", "only 6 bytes"),
    "version 1": (_header(0, 0, version=1) + bytes(8), "version 1 is not supported"),
    "huge tensor count": (_header(2**60, 0) + bytes(64), "tensor count 1152921504606846976 cannot fit"),
    "huge kv count": (_header(0, 2**40) + bytes(64), "metadata count"),
    "huge key length": (_header(0, 1) + struct.pack("<Q", 2**62) + bytes(64), "limit 65536"),
    "huge string value": (_header(0, 1) + _s("general.name") + struct.pack("<IQ", 8, 2**40) + b"x" * 16,
                          "needs 1099511627776 bytes"),
    "huge array": (_header(0, 1) + _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**50) + bytes(32),
                   "array of 1125899906842624 items cannot fit"),
    "truncated header": (_header(0, 2) + _kv_u32("a.b", 1) + _s("general.name")[:10], "truncated or corrupt"),
    "unknown value type": (_header(0, 1) + _s("x") + struct.pack("<I", 99) + bytes(16), "unknown value type 99"),
    "tensor beyond eof": (_header(1, 0) + _tensor("token_embd.weight", (8, 8), 0, 0) + bytes(64),
                          "beyond the end of the file"),
    "tensor rank 9": (_header(1, 0) + _tensor("t", (1,) * 9, 0, 0) + bytes(64), "rank 9"),
    "huge dims": (_header(1, 0) + _tensor("t", (2**40, 2**40), 0, 0) + bytes(64), "larger than the file"),
    "unknown ggml type": (_header(1, 0) + _tensor("t", (4,), 77, 0) + bytes(64), "unknown ggml type 77"),
    "unaligned offset": (_header(1, 0) + _tensor("t", (4,), 0, 3) + bytes(64), "not aligned"),
    "bad alignment": (_header(0, 1) + _kv_u32("general.alignment", 3) + bytes(16), "power of two"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_gguf_is_refused_quickly(case, tmp_path, home):
    from common.models import resolve_model

    data, expected = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        resolve_model(str(path))
    assert time.perf_counter() - t0 < 1.0
    assert str(path) in err.value.message and expected in err.value.render(), err.value.render()
    assert not (home / "models").exists() or not any((home / "models").glob("bad-*"))


def test_truncated_real_file_is_refused(tiny_gguf, tmp_path, home):
    from common.models.gguf_import import import_gguf

    data = tiny_gguf.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 200):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated or corrupt|beyond the end"):
            import_gguf(path)
    assert not any((home / "models").glob("cut*")) if (home / "models").exists() else True


def test_cli_import_reports_a_bad_file_without_traceback(tmp_path, home, capsys):
    from common.models.cmd import main

    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    assert main(["import", str(path)]) == 2
    err = capsys.readouterr().err
    assert "wrong magic" in err and "Traceback" not in err


def test_unsupported_architecture_is_named(tmp_path, home):
    import gguf

    from common.models.gguf_import import import_gguf

    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="architecture 'mamba' cannot be imported"):
        import_gguf(tmp_path / "mamba.gguf")


# ---------------------------------------------------------------------------
# llama.cpp agrees (llama-cpp-python)


@pytest.mark.llama
def test_tiny_tokenizer_ids_equal_llama_cpp(tiny_gguf, home):
    llama_cpp = pytest.importorskip("llama_cpp")
    from common.models import load_tokenizer
    from common.models.gguf_import import import_gguf

    tok = load_tokenizer(import_gguf(tiny_gguf))
    llm = llama_cpp.Llama(str(tiny_gguf), vocab_only=True, verbose=False)
    for text in PROBES:
        assert tok(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=True), text


UNTIED = ("llama", "mistral", "phi3")  # rows round-tripped with their own lm_head; the others tied


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_supported_architecture_round_trips_through_our_exporter(arch, tmp_path, home):
    """HF -> GGUF (llm-ft export, F32) -> HF (import): identical tensors, config and logits, same token ids."""
    # regression: gemma2 failed (llama.cpp has no output tensor for it); phi3's sliding_window 0 became a 0 window
    torch = pytest.importorskip("torch")
    from tiny import make_model
    from transformers import AutoModelForCausalLM

    from common.export.cmd import ExportConfig, run
    from common.models import load_tokenizer
    from common.models.gguf_import import import_gguf

    src = make_model(tmp_path / arch, arch, tie=arch not in UNTIED)
    out = tmp_path / f"{arch}.gguf"
    run(ExportConfig(source=str(src), quant="f32", out=str(out), verify=False, pre="gpt-2"))
    imported = import_gguf(out)
    want, got = _safetensors(src), _safetensors(imported)
    if "lm_head.weight" not in got:  # tied: the embedding is the output projection
        want.pop("lm_head.weight", None)
    assert sorted(got) == sorted(want)
    for name, value in want.items():  # the inverse transforms undo the forward ones (norm + 1 - 1: to 1 ulp)
        atol = 2.5e-7 if ARCHS[arch].norm_shift and name.endswith("norm.weight") else 0
        np.testing.assert_allclose(got[name], value, rtol=0, atol=atol, err_msg=name)
    src_cfg, imp_cfg = (json.loads((d / "config.json").read_text()) for d in (src, imported))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert imp_cfg[key] == src_cfg[key], key
    ids = torch.tensor([[1, 5, 9, 30, 77, 120, 3, 2, 50, 60]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    a, b = load_tokenizer(imported), load_tokenizer(src)
    for text in PROBES:
        assert a(text)["input_ids"] == b(text)["input_ids"], text


def _safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _tiny_sentencepiece():
    """A SentencePiece BPE vocabulary (byte fallback, split digits) trained on the tiny corpus."""
    import io

    spm = pytest.importorskip("sentencepiece")
    from tiny import CORPUS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"])
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())

    def kind(i: int) -> int:  # llama.cpp's token types
        return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
                4 if sp.id_to_piece(i).startswith("<|") else 1)

    n = sp.get_piece_size()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    return sp, meta


def test_sentencepiece_vocabulary_tokenizes_like_sentencepiece():
    from common.models.gguf_tokenizer import build_tokenizer

    sp, meta = _tiny_sentencepiece()
    tok, kind = build_tokenizer(meta)
    assert kind.startswith("SentencePiece") and tok.add_bos_token and tok.bos_token == "<s>"
    # texts without whitespace runs, tabs or newlines: sentencepiece's own normalizer (which llama.cpp
    # does not apply) leaves them alone
    for text in ["Hello world", "set a timer for 10 minutes", "emoji 😀 and 中文", "x", "remind me at 5pm!"]:
        assert tok(text)["input_ids"] == [1] + sp.encode(text), text
    assert tok.decode(tok("set a timer for 10 minutes")["input_ids"], skip_special_tokens=True) == \
        "set a timer for 10 minutes"


@pytest.mark.llama
def test_sentencepiece_vocabulary_tokenizes_like_llama_cpp(tmp_path):
    import gguf

    llama_cpp = pytest.importorskip("llama_cpp")
    from common.models.gguf_tokenizer import build_tokenizer

    _, meta = _tiny_sentencepiece()
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 64),
                       (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_head_count_kv, 4),
                       (w.add_rope_dimension_count, 16), (w.add_layer_norm_rms_eps, 1e-6)]:
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok, _ = build_tokenizer(meta)
    llm = llama_cpp.Llama(str(tmp_path / "spm.gguf"), vocab_only=True, verbose=False)
    for text in PROBES + [" leading", "  two  spaces", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=True), text


def test_large_imports_are_sharded_with_an_index(tiny_gguf, tiny_model_dir, home, monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from common.models import gguf_import

    monkeypatch.setattr(gguf_import, "SHARD_BYTES", 100_000)  # the tiny model is ~400 KB of float32
    out = gguf_import.import_gguf(tiny_gguf)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits,
                                   AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits, rtol=0, atol=1e-6)
