"""``llm-ft eval`` end to end on a tiny model: a run (base + LoRA, unmerged), its base, a merged
directory and a GGUF in llama.cpp, scored on a few rows."""

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::FutureWarning")]

SYSTEM = "Answer with JSON."
TRAINED = [
    ("set a timer for ten minutes", {"intent": "set_timer", "slots": {"duration": "ten minutes"}}),
    ("play some jazz", {"intent": "play_music", "slots": {"genre": "jazz"}}),
    ("what's the weather in Paris tomorrow",
     {"intent": "get_weather", "slots": {"location": "Paris", "date": "tomorrow"}}),
]
UNSEEN = ("remind me to call mom at 5pm", {"intent": "set_reminder", "slots": {"task": "call mom", "time": "5pm"}})
SCHEMA = {"type": "object", "required": ["intent", "slots"], "additionalProperties": False,
          "properties": {"intent": {"enum": ["set_timer", "play_music", "get_weather", "set_reminder"]},
                         "slots": {"type": "object", "additionalProperties": {"type": "string"}}}}


def train_adapter(model_dir: Path, out_dir: Path, rows, steps: int = 200) -> Path:
    """Fit a LoRA adapter (peft, all linear layers) until the tiny model answers ``rows`` greedily."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.models import load_tokenizer
    from common.prompts import ChatFormatter
    from common.rows import Conversation

    torch.set_num_threads(1)
    fmt = ChatFormatter(load_tokenizer(model_dir), system_prompt=SYSTEM)
    exs = [fmt.encode(Conversation([{"role": "user", "content": u}, {"role": "assistant", "content": json.dumps(a)}]))
           for u, a in rows]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    width = max(len(e) for e in exs)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e)) for e in exs])
    attn = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in exs])
    labels = torch.tensor([[t if m else -100 for t, m in zip(e.input_ids, e.loss_mask, strict=True)] + [-100] * (width - len(e))
                           for e in exs])
    for _ in range(steps):
        model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A run directory as common/run_dir.py describes it, and a merged copy of its model."""
    root = tmp_path_factory.mktemp("eval")
    run = root / "runs" / "tiny-run"
    model = train_adapter(tiny_model_dir, run / "adapter", TRAINED)
    (run / "config.json").write_text(json.dumps({"model": str(tiny_model_dir), "backend": "torch",
                                                 "base_model": {"path": str(tiny_model_dir)}, "data": ["data"]}))
    (run / "system_prompt.txt").write_text(SYSTEM + "\n")
    (run / "summary.json").write_text(json.dumps({"train_time_s": 3.5, "peak_memory_bytes": 12345678,
                                                  "tokens_per_s": 250.0}))
    merged = root / "merged"
    model.merge_and_unload().save_pretrained(str(merged), safe_serialization=True)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special", "chat_template", "generation")):
            (merged / f.name).write_bytes(f.read_bytes())
    data = root / "data"
    data.mkdir()
    with open(data / "test.jsonl", "w") as fh:
        for user, answer in [*TRAINED, UNSEEN]:
            fh.write(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": json.dumps(answer)}]}) + "\n")
    (data / "schema.json").write_text(json.dumps(SCHEMA))
    return root, run, merged


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_run_and_compare_with_base(tiny_run, tiny_model_dir, monkeypatch, capsys):
    from common.evaluate.cmd import main

    root, run, _ = tiny_run
    monkeypatch.chdir(root)  # the run's data (["data"]) resolves here
    assert main([str(run), "--compare", str(tiny_model_dir), "--batch-size", "3", "--max-new-tokens", "40"]) == 0
    # Regression: the metrics and comparison tables went to stderr with the progress log.
    out, err = capsys.readouterr()
    assert "intent" in out and "exact" in out and "wrote" in out and "next:" in err

    result = json.loads((run / "eval" / "metrics.json").read_text())
    m = result["metrics"]
    assert result["task"] == "json" and result["data"] == "data/test.jsonl"
    assert result["generator"]["kind"] == "run" and result["generator"]["adapter"].endswith("adapter")
    assert m["n"] == 4
    assert m["exact_match"] == 0.75  # the three trained rows, not the unseen one
    assert m["parse_rate"] >= 0.75 and m["schema_valid_rate"] >= 0.75
    assert m["intent_accuracy"] >= 0.75 and 0 < m["intent_macro_f1"] <= 1
    assert m["errors"] == 1
    assert m["eval_loss"] > 0 and m["perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"])
    assert result["per_field"]["slots.genre"] == {"accuracy": 1.0, "correct": 1, "support": 1}
    # the schema's labels in its order, then one "other" row (no labels invented by the model)
    assert result["confusion"]["labels"] == ["set_timer", "play_music", "get_weather", "set_reminder", "other"]

    errors = [json.loads(line) for line in (run / "eval" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1
    assert errors[0]["prompt"] == UNSEEN[0] and json.loads(errors[0]["expected"]) == UNSEEN[1]
    assert errors[0]["produced"] != errors[0]["expected"] and errors[0]["problems"]
    assert errors[0]["source"].endswith("test.jsonl:4")
    assert is_png(run / "eval" / "confusion.png")

    # --compare MODEL writes inside the run, not ./runs/eval-<name> in the current directory
    assert not (root / "runs" / f"eval-{tiny_model_dir.name}").exists()
    base = json.loads((run / "eval" / "compare" / tiny_model_dir.name / "metrics.json").read_text())
    assert base["generator"]["kind"] == "model" and base["generator"]["system_prompt"]  # the run's prompt
    assert base["metrics"]["exact_match"] == 0.0  # untrained: fine-tuning is what made the difference
    assert base["metrics"]["eval_loss"] > m["eval_loss"]

    md = (run / "eval" / "compare.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 4  # header, rule, two targets
    assert "exact" in lines[0] and "train time" in lines[0] and "peak mem" in lines[0]
    assert lines[2].startswith("| tiny-run |") and "75.0%" in lines[2] and "3.5 s" in lines[2] and "11.8 MiB" in lines[2]
    assert tiny_model_dir.name in lines[3]


def test_eval_merged_dir_matches_run(tiny_run, monkeypatch):
    from common.evaluate.cmd import EvalConfig
    from common.evaluate.cmd import run as run_eval

    root, run, merged = tiny_run
    monkeypatch.chdir(root)
    out = root / "merged-eval"
    run_eval(EvalConfig(target=str(merged), data="data/test.jsonl", out=str(out), system_prompt_file=str(
        run / "system_prompt.txt"), max_new_tokens=40, limit=3, samples=2))
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"]["n"] == 3 and m["metrics"]["exact_match"] == 1.0
    assert (out / "errors.jsonl").read_text() == ""
    assert len(m["samples"]) == 2 and m["samples"][0]["produced"] == json.dumps(TRAINED[0][1])


@pytest.mark.llama
def test_eval_gguf_fidelity(tiny_run, monkeypatch):
    pytest.importorskip("llama_cpp")
    from test_chat import write_tiny_gguf

    from common.evaluate.cmd import EvalConfig
    from common.evaluate.cmd import run as run_eval

    root, run, _ = tiny_run
    monkeypatch.chdir(root)
    base = json.loads((run / "config.json").read_text())["base_model"]["path"]
    gguf = write_tiny_gguf(base, run / "export" / "model.gguf", adapter_dir=run / "adapter")  # export merges the adapter
    run_eval(EvalConfig(target=str(gguf), max_new_tokens=40))
    m = json.loads((run / "export" / "eval-model" / "metrics.json").read_text())  # a GGUF in RUN/export/ belongs to the run
    ref = json.loads((run / "eval" / "metrics.json").read_text()) if (run / "eval" / "metrics.json").exists() else None
    assert m["generator"]["backend"] == "llama.cpp" and m["generator"]["system_prompt"]
    assert m["generator"]["tokenizer"] != "gguf"  # rendered with the base model's HF template
    assert m["metrics"]["exact_match"] == 0.75
    if ref is not None:  # F32 export: the same answers and (nearly) the same loss as base + adapter
        assert m["metrics"]["eval_loss"] == pytest.approx(ref["metrics"]["eval_loss"], rel=1e-3)


def test_eval_text_task_reports_loss_and_samples(tiny_model_dir, tmp_path):
    from common.evaluate.cmd import EvalConfig
    from common.evaluate.cmd import run as run_eval

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                       {"role": "assistant", "content": a}]})
                              for u, a in [("hello", "hi there"), ("thanks", "you are welcome")]) + "\n")
    run_eval(EvalConfig(target=str(tiny_model_dir), data=str(data), out=str(tmp_path / "out"), max_new_tokens=5,
                        samples=1, system_prompt_file=""))
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["task"] == "text" and m["metrics"]["n"] == 2
    assert m["metrics"]["eval_tokens"] > 0 and m["metrics"]["perplexity"] > 1
    assert len(m["samples"]) == 1 and not (tmp_path / "out" / "errors.jsonl").exists()


def test_eval_user_errors(tiny_model_dir, tmp_path, capsys):
    from common.evaluate.cmd import main

    assert main([str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "test data not found" in capsys.readouterr().err
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                            {"role": "assistant", "content": "not json"}]}) + "\n")
    assert main([str(tiny_model_dir), "--data", str(bad), "--task", "json"]) == 2
    err = capsys.readouterr().err
    assert "t.jsonl:1: expected answer is not JSON" in err and "Traceback" not in err
    assert main([str(tiny_model_dir), "--top-p", "0"]) == 2


@pytest.mark.mlx
def test_eval_run_on_mlx_matches_torch(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("mlx_lm")
    from common.evaluate.cmd import EvalConfig
    from common.evaluate.cmd import run as run_eval

    root, run, _ = tiny_run
    monkeypatch.chdir(root)
    results = {}
    for backend in ("mlx", "torch"):
        run_eval(EvalConfig(target=str(run), backend=backend, out=str(tmp_path / backend), max_new_tokens=40, limit=3))
        results[backend] = json.loads((tmp_path / backend / "metrics.json").read_text())
    assert results["mlx"]["generator"]["backend"] == "mlx"
    assert results["mlx"]["metrics"]["exact_match"] == 1.0  # the PEFT adapter, loaded into MLX LoRA layers
    assert results["mlx"]["metrics"]["eval_loss"] == pytest.approx(results["torch"]["metrics"]["eval_loss"], rel=1e-4)


def test_run_without_adapter_is_a_clear_error(tmp_path, tiny_model_dir):
    from common.errors import UserError
    from common.generation import resolve_target

    run = tmp_path / "runs" / "early"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": str(tiny_model_dir), "base_model": {"path": str(tiny_model_dir)}}))
    with pytest.raises(UserError, match="no adapter yet"):
        resolve_target(str(run))
