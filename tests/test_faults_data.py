"""Faults that must not lose data, each as the user's command on a tiny model: the answer is one
`error:` line (no traceback, non-zero exit) and every file that was there before is byte-identical
afterwards. merge --out onto the run or the base, a failed export verification, two writers on
one run, rotation past a corrupt checkpoint, a file-size limit and an unwritable --out, a
non-finite eval loss, Ctrl-C, and a --resume of a finished run."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from rich.console import Console  # noqa: E402

from common.options import TrainConfig  # noqa: E402
from common.run_dir import LOCK_FILE, RunLock  # noqa: E402
from common.train import checkpoint as ckpts  # noqa: E402
from common.train.cmd import run as train  # noqa: E402

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    ("set a timer for ten minutes", '{"intent": "set_timer", "slots": {"duration": "10 minutes"}}'),
    ("what's the weather in Paris tomorrow", '{"intent": "get_weather", "slots": {"location": "Paris"}}'),
    ("play some jazz", '{"intent": "play_music", "slots": {"genre": "jazz"}}'),
    ("hello world", '{"intent": "unknown", "slots": {}}'),
]
ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "2000"}  # COLUMNS: rich must not wrap paths
SETTINGS = dict(max_steps=6, batch_size=2, lr=5e-3, warmup_steps=0, eval_every=3, save_every=2, keep=2,
                sample_prompts=0, seed=7)


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


def config(model, data, out, **kw) -> TrainConfig:
    return TrainConfig(**{"model": str(model), "data": [str(data)], "system_prompt_file": "", "out": str(out),
                          **SETTINGS, **kw})


def argv(model, data, out, **kw) -> list[str]:
    args = ["--model", str(model), "--data", str(data), "--system-prompt-file", "", "--out", str(out)]
    for k, v in {**SETTINGS, **kw}.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def snapshot(*dirs: Path) -> dict[str, bytes]:
    """Every file under ``dirs`` with its bytes (the lock file aside: it only lives while a command runs)."""
    return {str(p): p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def cli(*args: str, limit_bytes: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``llm-ft ARGS`` in a child process, optionally under a file-size limit (``ulimit -f``)."""
    pre = ""
    if limit_bytes is not None:  # SIGXFSZ ignored: the write fails with EFBIG, as on a full filesystem
        pre = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); ")
    code = pre + "import sys; from common.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode not in (0, None), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, data_dir, tmp_path_factory):
    """A finished 6-step run: checkpoints at 4 and 6 (keep 2), evaluations at 3 and 6."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert train(config(tiny_model_dir, data_dir, out), console=quiet()) == 0
    return out


# ---------------------------------------------------------------------------
# merge --out


@pytest.fixture()
def merge_run(tmp_path):
    from test_merge import make_run

    rd = make_run(tmp_path, "llama")
    return rd, tmp_path / "base"


@pytest.mark.parametrize("target", ["run", "base", "parent", "foreign", "previous"])
def test_merge_never_replaces_a_folder_it_was_not_given(merge_run, tmp_path, target):
    # merge --out RUN deleted the run's adapter; --out BASE overwrote the base weights
    rd, base = merge_run
    out = {"run": rd, "base": base, "parent": tmp_path, "foreign": tmp_path / "mine",
           "previous": tmp_path / "merged-before"}[target]
    if target == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
        (out / "config.json").write_text("{}")
    if target == "previous":
        assert cli("merge", str(rd), "--out", str(out)).returncode == 0
    before = snapshot(tmp_path)
    proc = cli("merge", str(rd), "--out", str(out))
    assert_one_error(proc, str(out))
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no staging folder left behind
    if target == "previous":  # a previous merge the user names with --force may go
        assert cli("merge", str(rd), "--out", str(out), "--force").returncode == 0
    if target in ("run", "base"):  # not even with --force
        assert_one_error(cli("merge", str(rd), "--out", str(out), "--force"), "never writes into or over")
        assert snapshot(tmp_path) == before


def test_merge_default_out_is_replaced_by_a_new_merge(merge_run):
    rd, _ = merge_run
    from common.export.merge_cmd import MergeConfig, run

    first = run(MergeConfig(run=str(rd)))
    (first / "model.safetensors").write_bytes(b"stale")
    run(MergeConfig(run=str(rd)))
    assert (first / "model.safetensors").read_bytes() != b"stale"


# ---------------------------------------------------------------------------
# export: published only after verification


def test_failed_verification_keeps_the_published_export(merge_run, tmp_path):
    # a failing export replaced the verified model.gguf/Modelfile/verify.json and still printed "ollama create"
    pytest.importorskip("llama_cpp")
    rd, _ = merge_run
    out = tmp_path / "exp" / "m.gguf"
    common = [str(rd), "--quant", "f32", "--out", str(out), "--verify-prompts", "1", "--max-new-tokens", "2"]
    good = cli("export", *common, "--pre", "gpt-2")
    assert good.returncode == 0, good.stderr[-2000:]
    before = snapshot(out.parent)
    assert set(map(Path, before)) == {out, out.with_name("Modelfile"), out.with_name("verify.json")}
    bad = cli("export", *common, "--pre", "llama-bpe")  # llama-bpe splits digits differently: tokens differ
    assert bad.returncode == 1
    assert_one_error(bad, "verification failed", "m.failed")
    assert "ollama create" not in bad.stdout
    kept = out.parent / "m.failed"
    assert json.loads((kept / "verify.json").read_text())["passed"] is False
    assert (kept / "m.gguf").exists() and (kept / "Modelfile").exists()
    assert {k: v for k, v in snapshot(out.parent).items() if "m.failed" not in k} == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------
# one writer per run directory


def test_second_writer_is_refused_with_the_holders_pid(tiny_model_dir, data_dir, tmp_path):
    # two trains 4 s apart on one --out both ran to the end, writing every metrics row twice
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.run_dir import RunLock; "
                               "RunLock(sys.argv[1], 'llm-ft train').acquire(); print('held', flush=True); "
                               "time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_one_error(cli("train", *argv(tiny_model_dir, data_dir, out)), str(out), f"pid {holder.pid}",
                         "llm-ft train")
        assert snapshot(out) == {}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder was killed: its lock file stays, the kernel's lock went with it
    assert (out / LOCK_FILE).exists()
    assert train(config(tiny_model_dir, data_dir, out, max_steps=2, eval_every=0), console=quiet()) == 0
    assert not (out / LOCK_FILE).exists()
    with RunLock(out, "llm-ft train --resume"):  # and a live in-process holder refuses merge's own lock too
        with pytest.raises(Exception, match=f"pid {os.getpid()}"):
            RunLock(out, "llm-ft export").acquire()


# ---------------------------------------------------------------------------
# checkpoint rotation


def test_rotation_counts_only_verified_checkpoints(base_run, tiny_model_dir, data_dir, tmp_path):
    # rotation kept a corrupt newest step and deleted the older good one
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    bad = out / "checkpoints/step-6/adapter/adapter_model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    good_before = snapshot(out / "checkpoints/step-4")
    assert train(config(tiny_model_dir, data_dir, out, max_steps=5, save_every=1, resume=True),
                 console=quiet()) == 0
    assert snapshot(out / "checkpoints/step-4") == good_before and not ckpts.verify(out / "checkpoints/step-4")
    assert not ckpts.verify(out / "checkpoints/step-5")
    assert [s for s, _ in ckpts.steps(out)] == [6, 5, 4]  # the corrupt one is left for inspection


# ---------------------------------------------------------------------------
# a write the system refuses


def test_file_size_limit_on_config_json(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    proc = cli("train", *argv(tiny_model_dir, data_dir, out), limit_bytes=400)
    assert_one_error(proc, str(out / "config.json"), "file too large")
    assert not (out / "config.json").exists()


def test_file_size_limit_on_a_checkpoint_keeps_the_earlier_ones(base_run, tiny_model_dir, data_dir, tmp_path):
    # a full disk while writing a checkpoint was a SafetensorError traceback (os error 28/27)
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    ckpt = out / "checkpoints/step-6"
    adapter_bytes = (ckpt / "adapter/adapter_model.safetensors").stat().st_size
    optimizer_bytes = (ckpt / "optimizer.safetensors").stat().st_size
    assert optimizer_bytes > adapter_bytes + 4096
    kept = snapshot(out / "checkpoints", out / "adapter")
    proc = cli("train", *argv(tiny_model_dir, data_dir, out, max_steps=8, save_every=1, resume=True),
               limit_bytes=(adapter_bytes + optimizer_bytes) // 2)
    line = assert_one_error(proc, "step-7", "file too large", "--resume")
    assert str(ckpt) in line  # the checkpoint it can resume from
    assert snapshot(out / "checkpoints", out / "adapter") == kept
    assert not list((out / "checkpoints").glob(".*"))


def test_out_under_a_file(tiny_model_dir, data_dir, tmp_path, base_run):
    # a read-only or impossible --out: one line, before any model is loaded (root ignores chmod, so a file is in the way)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = cli("train", *argv(tiny_model_dir, data_dir, blocker / "run"))
    assert_one_error(proc, str(blocker / "run"), "not a folder")
    proc = cli("eval", str(base_run), "--data", str(data_dir / "valid.jsonl"), "--out", str(blocker / "eval"),
               "--max-new-tokens", "2")
    assert_one_error(proc, str(blocker / "eval"))
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------------------
# a non-finite eval loss, Ctrl-C, a finished --resume


@pytest.fixture(scope="module")
def poisoned_valid(tiny_model_dir, tmp_path_factory):
    """An untied tiny model whose embedding of one token is NaN; that token appears only in valid.jsonl."""
    from safetensors.torch import load_file, save_file
    from tiny import make_model, write_chat_jsonl

    from common.models import load_tokenizer

    root = tmp_path_factory.mktemp("poison")
    model = make_model(root / "model", tie=False, tokenizer_dir=tiny_model_dir)
    tok = load_tokenizer(model)
    clean = set()
    for u, a in ROWS:
        clean |= set(tok.encode(u + a))
    bad_text = "@#$%^&*"
    token = next(t for t in tok.encode(bad_text) if t not in clean)
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in weights if "embed_tokens" in k)
    weights[key][token] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    data = root / "data"
    write_chat_jsonl(data / "train.jsonl", ROWS)
    write_chat_jsonl(data / "valid.jsonl", [ROWS[0], (bad_text, '{"intent": "unknown", "slots": {}}')])
    return model, data


def test_nonfinite_eval_loss_stops_cleanly_and_keeps_the_adapter(poisoned_valid, tmp_path):
    # a NaN first eval loss was a TypeError traceback in the progress line, leaving no adapter
    from safetensors.numpy import load_file

    model, data = poisoned_valid
    out = tmp_path / "run"
    proc = cli("train", *argv(model, data, out, batch_size=1, eval_every=2, save_every=1))
    assert_one_error(proc, "eval loss is nan at step 2", f"{data / 'valid.jsonl'}:2")
    assert "kept" in proc.stderr and "adapter" in proc.stderr
    weights = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert all((w == w).all() for w in weights.values())
    assert [s for s, _ in ckpts.steps(out)] == [1] and not ckpts.verify(out / "checkpoints/step-1")
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged"


def test_ctrl_c_leaves_the_adapter_it_names_and_the_resume_command(tiny_model_dir, data_dir, tmp_path):
    # after Ctrl-C the last line said "adapter: RUN/adapter" though no adapter had been written
    out = tmp_path / "run"
    args = argv(tiny_model_dir, data_dir, out, max_steps=100000, eval_every=0, save_every=0)
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **ENV})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"event": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert stdout.strip().splitlines()[-1] == f"adapter: {out / 'adapter'}"  # the result, on stdout
    assert "next: llm-ft eval" not in err  # not before the run is finished
    assert (out / "adapter/adapter_model.safetensors").exists()
    assert "llm-ft train " in err and err.count("--resume") >= 1 and str(ckpts.steps(out)[0][1]) in err


def test_resume_of_a_finished_run_rewrites_nothing(base_run, tiny_model_dir, data_dir, tmp_path):
    # a no-op --resume of a finished run rewrote summary.json
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    before = snapshot(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    console = quiet()
    assert train(config(tiny_model_dir, data_dir, out, resume=True), console=console) == 0
    assert "already finished" in console.file.getvalue()
    assert snapshot(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
