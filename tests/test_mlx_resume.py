"""`llm-ft train --backend mlx` killed with SIGKILL after a checkpoint, then resumed, ends
with the same adapter, bit for bit, as a run that was never interrupted (CPU, fp32,
dropout on so the MLX RNG state matters too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.mlx
pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
ROWS = [("set a timer for ten minutes", '{"intent": "set_timer"}'), ("play some jazz", '{"intent": "play_music"}'),
        ("what's the weather in Paris", '{"intent": "get_weather"}'), ("hello world", '{"intent": "unknown"}'),
        ("remind me to call mom at 5pm", '{"intent": "set_reminder"}'), ("thanks", '{"intent": "unknown"}')]


def command(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "common", "train", "--backend", "mlx", "--model", str(model_dir),
            "--data", str(data_dir), "--system-prompt-file", str(data_dir / "system.txt"), "--out", str(out),
            "--max-steps", str(STEPS), "--batch-size", "2", "--lr", "5e-3", "--warmup-steps", "2",
            "--lora-r", "4", "--lora-dropout", "0.1", "--eval-every", "0", "--save-every", "1", "--keep", "2",
            "--sample-prompts", "0", "--seed", "11", "--dtype", "float32", *extra]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def write_pairs(path: Path, rows) -> None:
    """Preference rows: the expected answer chosen, another intent rejected."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i, (prompt, answer) in enumerate(rows):
            wrong = rows[(i + 1) % len(rows)][1] if rows[(i + 1) % len(rows)][1] != answer else '{"intent": "x"}'
            fh.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": wrong}) + "\n")


# DPO (issue 20): the same guarantee, with the reference log-probs cached in the run directory
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_sigkill_after_a_checkpoint_then_resume_is_bitwise(tiny_model_dir, tmp_path, method):
    from tiny import write_chat_jsonl

    data = tmp_path / "data"
    if method == "sft":
        write_chat_jsonl(data / "train.jsonl", ROWS)
        write_chat_jsonl(data / "valid.jsonl", ROWS[:2])
    else:
        write_pairs(data / "train.jsonl", ROWS)
        write_pairs(data / "valid.jsonl", ROWS[:2])
    (data / "system.txt").write_text("You are an intent classifier.\n")
    extra = () if method == "sft" else ("--method", "dpo", "--precompute-ref")

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the uninterrupted run goes alongside the one to be killed (two cores, half the wall time)
    done = subprocess.Popen(command(tiny_model_dir, data, straight, *extra), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(command(tiny_model_dir, data, killed, *extra), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    ckpts = killed / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "manifest.json").exists()] \
            if ckpts.exists() else []
        if steps and max(steps) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way: {proc.stderr.read()[-2000:]}"
    last = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "manifest.json").exists())
    assert 3 <= last < STEPS

    assert done.wait(timeout=180) == 0, done.stderr.read()[-3000:]
    try:
        resumed = subprocess.run(command(tiny_model_dir, data, killed, *extra, "--resume"), cwd=ROOT, env=env(),
                                 capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        steps = sorted(p.name for p in ckpts.glob("step-*"))
        pytest.fail(f"the resumed run did not stop at --max-steps {STEPS} (checkpoints now: {steps})")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(straight / "adapter"), weights(killed / "adapter")
    assert a.keys() == b.keys() and a
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after SIGKILL + resume (killed after step {last})"
    a, b = weights(straight / "checkpoints" / f"step-{STEPS}" / "adapter"), weights(ckpts / f"step-{STEPS}" / "adapter")
    assert all(np.array_equal(a[k], b[k]) for k in a)
