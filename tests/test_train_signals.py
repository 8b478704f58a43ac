"""Killing a real training process: SIGKILL then --resume ends bitwise where an uninterrupted run
ends; Ctrl-C (SIGINT) writes a checkpoint and exits 130."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from rich.console import Console  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from common.options import TrainConfig  # noqa: E402
from common.train import checkpoint as ckpts  # noqa: E402
from common.train.cmd import run  # noqa: E402

pytestmark = pytest.mark.torch

ROWS = [
    ("set a timer for ten minutes", '{"intent": "set_timer", "slots": {"duration": "10 minutes"}}'),
    ("what's the weather in Paris tomorrow", '{"intent": "get_weather", "slots": {"location": "Paris"}}'),
    ("play some jazz", '{"intent": "play_music", "slots": {"genre": "jazz"}}'),
    ("hello world", '{"intent": "unknown", "slots": {}}'),
    ("remind me to call mom at 5pm", '{"intent": "set_reminder", "slots": {"task": "call mom"}}'),
]
# Dropout consumes the torch RNG every step, so equality also proves the RNG state is restored.
SETTINGS = dict(max_steps=36, batch_size=2, grad_accum=2, lr=5e-3, warmup_steps=4, lora_dropout=0.1,
                eval_every=5, save_every=3, keep=2, sample_prompts=0, seed=11)


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tiny import write_chat_jsonl

    d = tmp_path_factory.mktemp("data")
    write_chat_jsonl(d / "train.jsonl", ROWS)
    write_chat_jsonl(d / "valid.jsonl", ROWS[:2])
    return d


def argv(model_dir, data_dir, out, **kw) -> list[str]:
    args = ["--model", str(model_dir), "--data", str(data_dir), "--system-prompt-file", "", "--out", str(out)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "common.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (rc {proc.returncode}) before the test could signal it:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.005)


def tensors(path: Path) -> dict:
    return load_file(str(path))


def assert_bitwise(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and (ta[k] == tb[k]).all(), f"{a.name}: {k} differs"


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_model_dir, data_dir, tmp_path):
    reference = tmp_path / "reference"
    run(TrainConfig(model=str(tiny_model_dir), data=[str(data_dir)], system_prompt_file="", out=str(reference),
                    **SETTINGS), console=Console(file=io.StringIO()))

    killed = tmp_path / "killed"
    proc = spawn(argv(tiny_model_dir, data_dir, killed, **SETTINGS))
    wait_until(lambda: (killed / "checkpoints" / "step-6" / ckpts.MANIFEST).exists(), proc)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()  # it really died mid-run
    run(TrainConfig(model=str(tiny_model_dir), data=[str(data_dir)], system_prompt_file="", out=str(killed),
                    resume=True, **SETTINGS), console=Console(file=io.StringIO()))

    last = SETTINGS["max_steps"]
    assert_bitwise(reference / "adapter/adapter_model.safetensors", killed / "adapter/adapter_model.safetensors")
    for name in ("adapter/adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert_bitwise(reference / f"checkpoints/step-{last}/{name}", killed / f"checkpoints/step-{last}/{name}")
    assert train_losses(killed) == train_losses(reference)
    ref_summary = json.loads((reference / "summary.json").read_text())
    got_summary = json.loads((killed / "summary.json").read_text())
    assert (got_summary["best_step"], got_summary["best_eval_loss"]) == \
        (ref_summary["best_step"], ref_summary["best_eval_loss"])


def test_ctrl_c_writes_a_checkpoint_and_exits_130(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "interrupted"
    proc = spawn(argv(tiny_model_dir, data_dir, out, max_steps=100000, eval_every=0, save_every=0,
                      sample_prompts=0))
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and '"event": "train"' in metrics.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    newest = ckpts.steps(out)[0][1]
    assert ckpts.verify(newest) == []
    step = ckpts.read(newest)[0]["step"]
    assert step == train_losses(out)[-1][0] and step < 100000
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "interrupted"
    assert "interrupted" in err and "--resume" in err
