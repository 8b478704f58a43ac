"""``llm-ft push``: the staged folder, the model card (parsed back by huggingface_hub) and the Hub calls.

The Hub cannot be reached here: the upload is checked on an HfApi stand-in that records its
calls (the network boundary only); everything before it is the real code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::FutureWarning")]

from tiny_run import copy_data, train_tiny  # noqa: E402

import llm_ft  # noqa: E402


class RecordingHfApi:
    """Records create_repo / create_branch / upload_folder with the files present at upload time."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def create_branch(self, **kw):
        self.calls.append(("create_branch", kw))

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        kw["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", kw))

        class Info:
            commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/abc123"

        return Info()


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    data = copy_data(root / "data")
    result = train_tiny(tiny_model_dir, data, root / "runs" / "intent")
    llm_ft.evaluate(result.run_dir, data=str(data / "test.jsonl"), max_new_tokens=6, limit=3)
    return result.run_dir


def test_dry_run_stages_the_folder_and_prints_the_calls(run_dir, capsys):
    from common.cli import main

    assert main(["push", str(run_dir), "--repo", "someone/intent-lora", "--dry-run",
                 "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct@a1b2c3"]) == 0
    out, err = capsys.readouterr()
    staged = run_dir / "push" / "adapter"
    assert out.strip() == str(staged)
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "system_prompt.txt",
                     "training_config.json"]
    assert "upload_folder(repo_id='someone/intent-lora'" in err and "create_repo(" in err
    cfg = json.loads((staged / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg["revision"] == "a1b2c3"
    assert (staged / "adapter_model.safetensors").read_bytes() == \
        (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_no_local_path_is_uploaded(run_dir):
    # guards adapter_config.json (and the config) naming /tmp/... or /home/... of the trainer's machine
    result = llm_ft.push(run_dir, "someone/intent-lora", dry_run=True)
    cfg = json.loads((result.staged / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None  # a local tiny model: no Hub id known, no path either
    for name in result.files:
        text = (result.staged / name).read_bytes()
        assert str(run_dir.parent.parent).encode() not in text, name


def test_card_parses_back_with_huggingface_hub(run_dir):
    from huggingface_hub import ModelCard

    result = llm_ft.push(run_dir, "someone/intent-lora", dry_run=True, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    card = ModelCard((result.staged / "README.md").read_text())
    data = card.data
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["metrics"]
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.library_name == "peft"
    assert {"llm-ft", "lora", "peft"} <= set(data.tags)
    got = {r.metric_type: r.metric_value for r in data.eval_results}
    assert got["accuracy"] == pytest.approx(metrics["intent_accuracy"])
    assert got["parse_rate"] == pytest.approx(metrics["parse_rate"])
    fingerprint = json.loads((run_dir / "data_fingerprint.json").read_text())
    assert fingerprint["sha256"][:16] in card.text and "| lora_r | 4 |" in card.text
    assert "AutoPeftModelForCausalLM.from_pretrained('someone/intent-lora')" in card.text


def test_upload_calls_the_hub_with_repo_files_and_revision(run_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_shown")
    api = RecordingHfApi()
    result = llm_ft.push(run_dir, "someone/intent-lora", api=api, private=True, revision="v1")
    names = [c for c, _ in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kw for _, kw in api.calls)
    assert create == {"repo_id": "someone/intent-lora", "repo_type": "model", "private": True, "exist_ok": True}
    assert branch == {"repo_id": "someone/intent-lora", "branch": "v1", "exist_ok": True}
    assert upload["repo_id"] == "someone/intent-lora" and upload["revision"] == "v1"
    assert upload["files"] == result.files and "README.md" in upload["files"]
    assert result.url.endswith("/commit/abc123")
    out, err = capsys.readouterr()
    assert "hf_secret_never_shown" not in out + err
    assert not any("hf_secret_never_shown" in p.read_text(errors="ignore") for p in result.staged.rglob("*")
                   if p.is_file() and p.suffix != ".safetensors")


def test_gguf_push_stages_the_export_and_ollama_commands(run_dir):
    from huggingface_hub import ModelCard

    llm_ft.export(run_dir, quant="f32", verify=False, pre="gpt-2")
    result = llm_ft.push(run_dir, "someone/intent-gguf", what="gguf", dry_run=True)
    assert result.files == ["Modelfile", "README.md", "model-f32.gguf", "system_prompt.txt", "training_config.json"]
    card = ModelCard((result.staged / "README.md").read_text())
    assert card.data.library_name == "gguf" and "gguf" in card.data.tags
    assert "ollama run hf.co/someone/intent-gguf:F32" in card.text
    assert "ollama create intent-gguf -f Modelfile" in card.text


def test_push_user_errors(run_dir, tmp_path, capsys):
    from common.cli import main

    assert main(["push", str(run_dir), "--repo", "not a repo"]) == 2
    assert "repo: expected user/name or org/name" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nope"), "--repo", "a/b", "--dry-run"]) == 2
    assert "nope: run directory not found" in capsys.readouterr().err
