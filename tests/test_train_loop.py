"""The training loop with the torch backend on the tiny model, in-process (run(cfg) as the CLI does)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from rich.console import Console  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from common.errors import UserError  # noqa: E402
from common.options import TrainConfig  # noqa: E402
from common.train.cmd import main, run  # noqa: E402

pytestmark = pytest.mark.torch

ROWS = [
    ("set a timer for ten minutes", '{"intent": "set_timer", "slots": {"duration": "10 minutes"}}'),
    ("what's the weather in Paris tomorrow", '{"intent": "get_weather", "slots": {"location": "Paris", "date": "tomorrow"}}'),
    ("play some jazz", '{"intent": "play_music", "slots": {"genre": "jazz"}}'),
    ("hello world", '{"intent": "unknown", "slots": {}}'),
    ("remind me to call mom at 5pm", '{"intent": "set_reminder", "slots": {"task": "call mom", "time": "5pm"}}'),
    ("thanks", '{"intent": "unknown", "slots": {}}'),
]
SYSTEM = "You are an intent classifier. Answer with JSON only."


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tiny import write_chat_jsonl

    d = tmp_path_factory.mktemp("data")
    write_chat_jsonl(d / "train.jsonl", ROWS)
    write_chat_jsonl(d / "valid.jsonl", ROWS[:2])
    (d / "system.txt").write_text(SYSTEM + "\n")
    return d


def config(model_dir, data_dir, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=[str(data_dir)], system_prompt_file=str(data_dir / "system.txt"),
                out=str(out), max_steps=6, batch_size=2, lr=5e-3, warmup_steps=0, eval_every=3, save_every=2,
                keep=2, sample_prompts=0, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def text_of(console: Console) -> str:
    return console.file.getvalue()


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def tensors(path: Path) -> dict:
    return load_file(str(path))


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, data_dir, tmp_path_factory):
    """One 6-step run with checkpoints at 2, 4, 6 (keep 2) and evaluations at 3 and 6."""
    out = tmp_path_factory.mktemp("runs") / "base"
    console = quiet()
    assert run(config(tiny_model_dir, data_dir, out, sample_prompts=1), console=console) == 0
    return out, text_of(console)


def test_run_directory_has_exactly_the_documented_files(base_run, tiny_model_dir):
    out, _ = base_run
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    state = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors",
             "optimizer.json", "rng.safetensors", "trainer_state.json", "run.json", "manifest.json"}
    assert files == {"config.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "metrics.jsonl", "loss.png", "summary.json", "system_prompt.txt", "data_fingerprint.json",
                     *{f"checkpoints/step-4/{f}" for f in state}, *{f"checkpoints/step-6/{f}" for f in state}}
    assert (out / "system_prompt.txt").read_bytes() == SYSTEM.encode()  # exact: the file's newline dropped, none added
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backend"] == "torch" and cfg["max_steps"] == 6
    assert cfg["base_model"] == {"spec": str(tiny_model_dir), "path": str(Path(tiny_model_dir).resolve()),
                                 "source": "local", "gguf_file": None}
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert adapter_cfg["r"] == 16 and len(adapter_cfg["target_modules"]) == 7
    summary = json.loads((out / "summary.json").read_text())
    for key in ("wall_time_s", "tokens", "tokens_per_s", "peak_memory_bytes", "best_step", "best_eval_loss",
                "backend", "device", "dtype", "trainable_params"):
        assert summary[key] is not None, key
    assert summary["steps"] == 6 and summary["device"] == "cpu" and summary["dtype"] == "float32"
    fp = json.loads((out / "data_fingerprint.json").read_text())
    assert fp["train"]["rows"] == 6 and fp["encoded"]["train"]["examples"] == 6
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_keeps_best_adapter_logs_evals_and_samples(base_run):
    out, log = base_run
    evals = events(out, "eval")
    assert [e["step"] for e in evals] == [3, 6]
    summary = json.loads((out / "summary.json").read_text())
    best = min(evals, key=lambda e: e["eval_loss"])
    assert summary["best_step"] == best["step"] and summary["best_eval_loss"] == pytest.approx(best["eval_loss"])
    if best["step"] == 6:
        assert same_tensors(out / "adapter/adapter_model.safetensors",
                            out / "checkpoints/step-6/adapter/adapter_model.safetensors")
    samples = events(out, "sample")
    assert [s["step"] for s in samples] == [3, 6] and samples[0]["prompt"] == ROWS[0][0]
    assert "sample 1:" in log and "eval loss" in log


def test_loss_falls_on_a_memorisation_set(tiny_model_dir, tmp_path):
    from tiny import write_chat_jsonl

    data = tmp_path / "data"
    write_chat_jsonl(data / "train.jsonl", ROWS[:3])
    write_chat_jsonl(data / "valid.jsonl", ROWS[:2])
    (data / "system.txt").write_text(SYSTEM)
    out = tmp_path / "memo"
    run(config(tiny_model_dir, data, out, max_steps=30, batch_size=3, lr=1e-2, schedule="constant", eval_every=15,
               save_every=0), console=quiet())
    losses = [e["loss"] for e in events(out, "train")]
    assert len(losses) == 30
    assert losses[-1] < 0.6 * losses[0], losses  # measured: 6.2 -> 3.0
    evals = [e["eval_loss"] for e in events(out, "eval")]
    assert evals[-1] < evals[0] < losses[0]


def test_same_seed_same_adapter(tiny_model_dir, data_dir, tmp_path):
    paths = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run(config(tiny_model_dir, data_dir, tmp_path / name, max_steps=2, eval_every=0, save_every=0, seed=seed),
            console=quiet())
        paths.append(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert same_tensors(paths[0], paths[1])
    assert not same_tensors(paths[0], paths[2])


def test_resume_skips_a_corrupt_checkpoint_with_a_warning(base_run, tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "copy"
    shutil.copytree(base_run[0], out)
    victim = out / "checkpoints/step-6/optimizer.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])  # a torn write
    console = quiet()
    run(config(tiny_model_dir, data_dir, out, max_steps=7, resume=True), console=console)
    assert "skipping checkpoint" in text_of(console) and "step-6" in text_of(console)
    resumes = events(out, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == 4 and resumes[0]["checkpoint"].endswith("step-4")
    assert [e["step"] for e in events(out, "train")] == [1, 2, 3, 4, 5, 6, 7]  # steps 5-6 replaced, not duplicated


def test_resume_refuses_a_different_run_listing_each_mismatch(base_run, tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "copy"
    shutil.copytree(base_run[0], out)
    with pytest.raises(UserError) as err:
        run(config(tiny_model_dir, data_dir, out, resume=True, lora_r=8, targets=["q_proj", "v_proj"]),
            console=quiet())
    keys = sorted(p.split(":")[0] for p in err.value.problems)
    assert keys == ["lora_r", "targets"], err.value.problems


def test_missing_optimizer_state_needs_allow_partial_resume(base_run, tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "copy"
    shutil.copytree(base_run[0], out)
    (out / "checkpoints/step-6/optimizer.safetensors").unlink()
    with pytest.raises(UserError, match="no optimizer state"):
        run(config(tiny_model_dir, data_dir, out, max_steps=7, resume=True), console=quiet())
    assert run(config(tiny_model_dir, data_dir, out, max_steps=7, resume=True, allow_partial_resume=True),
               console=quiet()) == 0
    assert events(out, "resume")[-1]["step"] == 6


def test_refuses_to_overwrite_a_run(base_run, tiny_model_dir, data_dir):
    with pytest.raises(UserError, match="already holds a run"):
        run(config(tiny_model_dir, data_dir, base_run[0]), console=quiet())


@pytest.fixture(scope="module")
def poisoned(tiny_model_dir, tmp_path_factory):
    """An untied tiny model whose embedding of one token is NaN, and data where one row uses that token."""
    import torch
    from safetensors.torch import load_file as load_pt
    from safetensors.torch import save_file
    from tiny import make_model, write_chat_jsonl

    from common.models import load_tokenizer

    root = tmp_path_factory.mktemp("poison")
    model = make_model(root / "model", tie=False, tokenizer_dir=tiny_model_dir)
    tok = load_tokenizer(model)
    clean = set()
    for u, a in ROWS:
        clean |= set(tok.encode(u + a + SYSTEM))
    bad_text = "@#$%^&*"
    token = next(t for t in tok.encode(bad_text) if t not in clean)
    wfile = model / "model.safetensors"
    weights = load_pt(str(wfile))
    key = next(k for k in weights if "embed_tokens" in k)
    weights[key][token] = float("nan")
    save_file(weights, str(wfile), metadata={"format": "pt"})
    data = root / "data"
    write_chat_jsonl(data / "train.jsonl", ROWS[:3] + [(bad_text, '{"intent": "unknown", "slots": {}}')] + ROWS[3:])
    write_chat_jsonl(data / "valid.jsonl", ROWS[:2])
    (data / "system.txt").write_text(SYSTEM)
    assert torch.isnan(weights[key]).any()
    return model, data


def test_nonfinite_loss_is_skipped_logged_and_never_saved(poisoned, tmp_path):
    model, data = poisoned
    out = tmp_path / "skip"
    # One example per step, one epoch: exactly one step sees the NaN-producing token.
    run(config(model, data, out, max_steps=7, batch_size=1, save_every=1, keep=10, eval_every=0,
               group_by_length=False), console=quiet())
    bad = events(out, "nonfinite")
    assert len(bad) == 1 and bad[0]["what"] == "loss" and bad[0]["action"] == "skip"
    assert bad[0]["examples"] == [f"{data / 'train.jsonl'}:4"]
    assert len(events(out, "train")) == 6  # every other step trained
    for f in out.rglob("adapter_model.safetensors"):
        for name, t in tensors(f).items():
            assert (t == t).all(), f"{f}: {name} is not finite"


def test_nonfinite_abort_stops_before_saving(poisoned, tmp_path):
    model, data = poisoned
    out = tmp_path / "abort"
    with pytest.raises(UserError, match="non-finite loss at step") as err:
        run(config(model, data, out, max_steps=7, batch_size=1, save_every=1, keep=10, eval_every=0,
                   group_by_length=False, nonfinite="abort"), console=quiet())
    step = events(out, "nonfinite")[0]["step"]
    assert f"step {step}" in err.value.message
    assert max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()) == step - 1 if step > 1 else True


def test_cli_end_to_end(tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(tiny_model_dir), "--data", str(data_dir), "--system-prompt-file", "", "--max-steps", "5",
            "--out", "runs/x", "--eval-every", "0", "--sample-prompts", "0"]
    assert main(argv) == 0
    assert (tmp_path / "runs/x/adapter/adapter_model.safetensors").exists()
    assert not (tmp_path / "runs/x/system_prompt.txt").exists()  # no system prompt: no file
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
