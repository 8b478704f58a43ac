"""GGUF export: every supported architecture loads in llama.cpp with logits equal to
transformers; metadata, tensor types, tied embeddings, Llama-3 rope, adapter GGUF,
the pre-tokenizer refusal, free-space check and atomicity under a full disk."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.archs import ARCHS
from common.errors import UserError
from common.export.cmd import ExportConfig, run

# The tiny tokenizer's fingerprint is unknown to llama.cpp, so tests name its pre-tokenizer.
# transformers loads it as Qwen2Tokenizer in a qwen2 model directory, with Qwen2's regex.
PRE = {"qwen2": "qwen2"}
PROMPT = "set a timer for ten minutes, then play some jazz 0123456789"


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader, key: str):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode("utf-8") if f.types[0].name == "STRING" else value.tolist()[0]


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama_logits(gguf_path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    from common.export.verify import llama_logits, load_llama

    llm = load_llama(gguf_path, lora=lora, n_ctx=128)
    try:
        return llama_logits(llm, ids)
    finally:
        llm.close()


def _nmse(a, b) -> float:
    return float(np.mean((a - b) ** 2) / np.mean(b ** 2))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random model per architecture, built on first use."""
    pytest.importorskip("torch")
    from tiny import make_model

    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_model(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return get


# ---------------------------------------------------------------------------
# every architecture, through the command


@pytest.mark.llama
@pytest.mark.torch
@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_arch_exports_and_matches_transformers(models, tmp_path, arch, quant):
    pytest.importorskip("llama_cpp")
    model_dir = models(arch)
    out = tmp_path / f"{arch}-{quant}.gguf"
    result = run(ExportConfig(source=str(model_dir), quant=quant, out=str(out), pre=PRE.get(arch, "gpt-2"), verify_prompts=1,
                              max_new_tokens=4))
    assert result.report is not None and result.report.passed, result.report.failures
    assert result.report.logits["nmse_max"] < 1e-4
    assert result.report.tokens["mismatches"] == []
    assert json.loads((tmp_path / "verify.json").read_text())["passed"] is True
    assert (tmp_path / "Modelfile").read_text().startswith("#")


@pytest.mark.llama
@pytest.mark.torch
def test_q8_0_and_q4_0_types_follow_llama_cpp_rules(models, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    model_dir = models("llama")
    ids = list(range(3, 40))
    want = _hf_logits(model_dir, ids)
    errors = {}
    for quant in ("q8_0", "q4_0"):
        out = tmp_path / f"m-{quant}.gguf"
        run(ExportConfig(source=str(model_dir), quant=quant, out=str(out), pre="gpt-2", verify=False))
        types = {t.name: t.tensor_type for t in _reader(out).tensors}
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32
        assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[quant.upper()]
        # tied embedding = llama.cpp's output projection: kept at 8 bits under q4_0
        assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
        assert "output.weight" not in types
        errors[quant] = _nmse(_llama_logits(out, ids), want)
    assert errors["q8_0"] < 5e-3 and errors["q8_0"] < errors["q4_0"]


@pytest.mark.llama
@pytest.mark.torch
def test_k_quant_through_llama_cpp(models, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    out = tmp_path / "m-q4_k_m.gguf"
    run(ExportConfig(source=str(models("qwen2")), quant="q4_k_m", out=str(out), pre="qwen2", verify=False))
    reader = _reader(out)
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert not list(tmp_path.glob(".*tmp"))  # the f16 intermediate is gone
    _llama_logits(out, [3, 4, 5])  # loads and runs


def test_k_quant_without_llama_cpp_says_how(monkeypatch, tmp_path):
    import common.export.gguf_file as gf

    monkeypatch.setattr(gf, "llama_cpp_available", lambda: False)
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    with pytest.raises(UserError, match=r"pip install 'llm-ft\[verify\]'"):
        gf.quantize_with_llama_cpp(tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_k_m")
    assert gf.default_quant(3_000_000_000)[0] == "q8_0"
    assert gf.default_quant(100_000_000)[0] == "q8_0"


# ---------------------------------------------------------------------------
# metadata, rope, tokenizer


@pytest.mark.torch
def test_metadata_and_tokenizer(models, tmp_path):
    model_dir = models("llama")
    out = tmp_path / "m.gguf"
    run(ExportConfig(source=str(model_dir), quant="f16", out=str(out), pre="gpt-2", verify=False))
    r = _reader(out)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(r, "tokenizer.chat_template") == (model_dir / "chat_template.jinja").read_text()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert _field(r, "tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(r, "tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds no BOS
    assert _field(r, "llama.rope.dimension_count") == 16
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses the embedding


def test_unknown_pre_tokenizer_is_an_error(models, tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(UserError) as exc:
        run(ExportConfig(source=str(models("llama")), quant="f16", out=str(tmp_path / "m.gguf"), verify=False))
    text = exc.value.render()
    assert "probe hash" in text and "--pre" in text
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizer_table():
    from common.export.tokenizer import PRE_BY_HASH, identify_pre

    assert PRE_BY_HASH["855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"] == "smollm"
    with pytest.raises(UserError, match="not a llama.cpp pre-tokenizer"):
        identify_pre(None, "x", override="made-up")


@pytest.mark.llama
@pytest.mark.torch
def test_llama3_rope_scaling_becomes_rope_freqs(models, tmp_path):
    """Llama 3.1-style rope_type llama3 must reach llama.cpp as the rope_freqs tensor."""
    pytest.importorskip("llama_cpp")
    model_dir = tmp_path / "l31"
    shutil.copytree(models("llama"), model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.gguf"
    run(ExportConfig(source=str(model_dir), quant="f32", out=str(out), pre="gpt-2", verify=False))
    assert "rope_freqs.weight" in {t.name for t in _reader(out).tensors}
    ids = list(range(3, 60))
    want = _hf_logits(model_dir, ids)
    plain = cfg | {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    (model_dir / "config.json").write_text(json.dumps(plain))
    assert _nmse(_hf_logits(model_dir, ids), want) > 1e-3  # the scaling matters at these frequencies
    assert _nmse(_llama_logits(out, ids), want) < 1e-4


# ---------------------------------------------------------------------------
# runs: merged and adapter-only


@pytest.mark.llama
@pytest.mark.torch
def test_run_export_default_paths_and_modelfile(tmp_path):
    pytest.importorskip("llama_cpp")
    from test_merge import SYSTEM, make_run

    run_dir = make_run(tmp_path, "qwen2")
    result = run(ExportConfig(source=str(run_dir), pre="qwen2", verify_prompts=1, max_new_tokens=4))
    assert result.quant == "q8_0"  # tiny model: the size rule picks q8_0
    assert result.gguf == run_dir / "export" / "model-q8_0.gguf"
    assert {p.name for p in (run_dir / "export").iterdir()} == {"model-q8_0.gguf", "Modelfile", "verify.json"}
    text = (run_dir / "export" / "Modelfile").read_text()
    assert f'SYSTEM """{SYSTEM}"""' in text
    assert "FROM ./model-q8_0.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert result.report.passed and result.report.logits["limit"] is None  # q8_0: measured, not judged


@pytest.mark.llama
@pytest.mark.torch
@pytest.mark.parametrize("arch, rslora", [("llama", False), ("llama", True), ("phi3", False)])
def test_adapter_gguf_matches_peft(tmp_path, arch, rslora):
    pytest.importorskip("llama_cpp")
    from test_merge import make_run, peft_logits

    run_dir = make_run(tmp_path, arch, use_rslora=rslora)
    result = run(ExportConfig(source=str(run_dir), quant="f32", adapter_only=True, pre="gpt-2", verify=False))
    assert result.gguf.name == "base-f32.gguf" and result.adapter_gguf.name == "adapter.gguf"
    r = _reader(result.adapter_gguf)
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_output.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    text = (run_dir / "export" / "Modelfile").read_text()
    assert "FROM ./base-f32.gguf\nADAPTER ./adapter.gguf\n" in text
    ids = list(range(3, 30))
    want = peft_logits(tmp_path / "base", run_dir / "adapter", ids)
    assert _nmse(_llama_logits(result.gguf, ids, lora=result.adapter_gguf), want) < 1e-4


@pytest.mark.torch
def test_dora_adapter_only_is_refused(tmp_path):
    from test_merge import make_run

    run_dir = make_run(tmp_path, use_dora=True, targets=["q_proj"])
    with pytest.raises(UserError, match="DoRA"):
        run(ExportConfig(source=str(run_dir), quant="f32", adapter_only=True, pre="gpt-2", verify=False))


# ---------------------------------------------------------------------------
# disk: free space first, atomic writes


@pytest.mark.torch
def test_disk_full_midway_leaves_the_good_file(models, tmp_path, monkeypatch):
    import gguf

    model_dir = models("llama")
    out = tmp_path / "m.gguf"
    run(ExportConfig(source=str(model_dir), quant="f32", out=str(out), pre="gpt-2", verify=False))
    good = out.read_bytes()
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def failing(self, tensor, *args, **kwargs):  # the disk fills up after a few tensors
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(UserError, match="disk full.*existing file is unchanged"):
        run(ExportConfig(source=str(model_dir), quant="f16", out=str(out), pre="gpt-2", verify=False))
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]  # no temporary file left


@pytest.mark.torch
def test_free_space_is_checked_before_writing(models, tmp_path, monkeypatch):
    import common.export.gguf_file as gf

    monkeypatch.setattr(gf, "free_bytes", lambda path: 1000)
    with pytest.raises(UserError, match="not enough free disk space"):
        run(ExportConfig(source=str(models("llama")), quant="f16", out=str(tmp_path / "m.gguf"), pre="gpt-2",
                         verify=False))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# SentencePiece tokenizers


def _spm_model(root: Path) -> Path:
    """A tiny llama whose tokenizer is a SentencePiece model (byte fallback, ChatML tokens)."""
    import io

    import sentencepiece as spm
    from tiny import CHATML, CORPUS, make_model

    tok_dir = root / "spm-tok"
    tok_dir.mkdir()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=420,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   minloglevel=2)
    (tok_dir / "tokenizer.model").write_bytes(buf.getvalue())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "legacy": False}))
    model_dir = make_model(root / "spm-llama", "llama", tokenizer_dir=tok_dir)
    shutil.copy(tok_dir / "tokenizer.model", model_dir / "tokenizer.model")
    (model_dir / "chat_template.jinja").write_text(CHATML)
    return model_dir


@pytest.mark.llama
@pytest.mark.torch
def test_sentencepiece_tokenizer(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sentencepiece")
    import gguf

    model_dir = _spm_model(tmp_path)
    out = tmp_path / "spm.gguf"
    result = run(ExportConfig(source=str(model_dir), quant="f32", out=str(out), verify_prompts=1, max_new_tokens=4))
    r = _reader(out)
    assert _field(r, "tokenizer.ggml.model") == "llama" and _field(r, "tokenizer.ggml.pre") == "default"
    assert "tokenizer.ggml.scores" in r.fields
    types = r.fields["tokenizer.ggml.token_type"]
    type_of = {i: int(types.parts[types.data[i]][0]) for i in range(8)}
    assert type_of[0] == gguf.TokenType.UNKNOWN and type_of[1] == gguf.TokenType.CONTROL
    assert type_of[3] in (gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL)  # <|im_start|>
    # rendered chat prompts tokenize identically; weights too
    assert result.report.passed, result.report.failures
    assert result.report.tokens["prompts_equal_with_bos"] == result.report.tokens["prompts"]
    assert result.report.logits["nmse_max"] < 1e-4


@pytest.mark.torch
def test_ollama_create_runs_create_then_a_smoke_prompt(models, tmp_path, monkeypatch):
    # a stand-in 'ollama' executable that records its arguments (Ollama itself is not installable here)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    (bin_dir / "ollama").write_text(f'#!/bin/sh\necho "$@" >> {log}\necho ok\n')
    (bin_dir / "ollama").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:" + __import__("os").environ["PATH"])
    out = tmp_path / "exp" / "m.gguf"
    run(ExportConfig(source=str(models("llama")), quant="f16", out=str(out), pre="gpt-2", verify=False,
                     ollama_create="Tiny Test"))
    calls = log.read_text().splitlines()
    assert calls[0] == f"create tiny-test -f {tmp_path / 'exp' / 'Modelfile'}"
    assert calls[1] == "run tiny-test Hello"
