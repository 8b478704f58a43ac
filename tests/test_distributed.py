"""Data-parallel training: torchrun with 2 gloo ranks on the CPU against one process.

Every rank draws the same micro-batches and trains on its share, normalised by the global
token count, so 2 ranks x grad_accum g must equal 1 rank x grad_accum 2g to fp32 noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tiny_run import REPO, copy_data  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

STEPS = 3


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLX_RANK")}
    env = {k: v for k, v in env.items() if k not in ("LOCAL_WORLD_SIZE", "LLM_FT_NPROC", "LLM_FT_INIT_TIMEOUT_S")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NO_COLOR="1")
    return env


def train_args(model: Path, data: Path, out: Path, grad_accum: int, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--backend", "torch",
            "--device", "cpu", "--dtype", "float32", "--max-steps", str(STEPS), "--batch-size", "1",
            "--grad-accum", str(grad_accum), "--lora-r", "4", "--eval-every", "0", "--save-every", "0",
            "--sample-prompts", "0", "--max-seq-length", "256", "--log-every", "1", "--seed", "5", *extra]


def run(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "common.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               "-m", "common.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    data = copy_data(base / "data", train=12, valid=2, test=0)
    one, two = base / "one", base / "two"
    run(train_args(tiny_model_dir, data, one, 4))
    proc = run([*train_args(tiny_model_dir, data, two, 2, "--save-every", "1"), "--nproc", "2"])
    return one, two, proc, tiny_model_dir, data


def test_two_ranks_equal_one_rank_with_grad_accum_doubled(runs):
    one, two = runs[:2]
    a, b = train_rows(one), train_rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["tokens"] == x["tokens"]  # tokens count the whole global step
        assert y["world_size"] == 2
    wa, wb = adapter(one), adapter(two)
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= 1e-6, diff
    assert max(float(v.abs().max()) for k, v in wb.items() if "lora_B" in k) > 0  # it did train


def test_rank_zero_alone_writes_every_artifact_once(runs):
    two, proc = runs[1:3]
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    # guards against every rank appending its own rows to metrics.jsonl (doubled steps)
    steps = [r["step"] for r in rows if r["event"] == "train"]
    assert steps == sorted(set(steps))
    assert (two / "summary.json").is_file() and (two / "config.json").is_file() and (two / "loss.png").is_file()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert proc.stdout.count("adapter: ") == 1  # rank 1 prints nothing but errors
    assert proc.stderr.count("training 3 steps") == 1


def cut_back(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of ``run_dir`` as if it had been stopped after checkpoint ``step``."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dest / "adapter")
    (dest / "summary.json").unlink()
    return dest


@pytest.mark.parametrize("nproc,grad_accum", [(1, 4), (2, 2)])
def test_a_two_rank_checkpoint_resumes_on_one_or_two_ranks(runs, tmp_path, nproc, grad_accum):
    _, two, _, model, data = runs
    out = cut_back(two, tmp_path / "run", 2)
    run([*train_args(model, data, out, grad_accum, "--save-every", "1", "--resume"), "--nproc", str(nproc)])
    assert train_rows(out)[-1]["loss"] == pytest.approx(train_rows(two)[-1]["loss"], rel=1e-5)
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3]
    wa, wb = adapter(two), adapter(out)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_resume_with_another_global_batch_is_refused(runs, tmp_path):
    _, two, _, model, data = runs
    out = cut_back(two, tmp_path / "run", 2)
    cmd = [sys.executable, "-m", "common.cli", *train_args(model, data, out, 2, "--resume")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "global_batch: checkpoint has 4, this run has 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def _child_with(env_key: str, value: str, root: int) -> int | None:
    """The pid of a descendant of ``root`` whose environment has ``env_key=value`` (a rank)."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children.get(pid, [])
    for pid in seen[1:]:
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{env_key}={value}".encode() in env and b"common.cli" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
            return pid
    return None


def kill_a_rank(args: list[str], out: Path, env_key: str) -> tuple[subprocess.CompletedProcess, float]:
    """Start ``args`` (a 2-process train), SIGKILL rank 1 once a step is logged; (result, seconds to end)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "common.cli", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and '"train"' in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        pid = _child_with(env_key, "1", proc.pid)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        stdout, stderr = proc.communicate(timeout=90)
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_rank_ends_the_job_naming_it(runs, tmp_path):
    _, _, _, model, data = runs
    out = tmp_path / "run"
    args = train_args(model, data, out, 2, "--save-every", "5")
    args[args.index("--max-steps") + 1] = "100000"
    result, seconds = kill_a_rank([*args, "--nproc", "2"], out, "RANK")
    assert result.returncode != 0
    assert seconds < 60
    assert "rank 1" in result.stderr, result.stderr[-3000:]
    assert "--resume" in result.stderr


def test_world_comes_from_the_launchers_environment():
    from common.errors import UserError
    from common.train.world import World, from_env

    assert from_env({}) == World()
    w = from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.is_main, w.distributed, w.launcher) == (1, 2, 1, False, True, "torchrun")
    assert from_env({"MLX_RANK": "0"}).distributed  # size known only once mx.distributed joins
    with pytest.raises(UserError, match="rank 2 is outside a world of 2"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})


class _Gathered:
    """The all_sum of a 2-rank job whose rank 1 resolved ``other`` (what the collective would return)."""

    def __init__(self, other: dict):
        self.other = other

    def all_sum(self, values):
        from common import config
        from common.train.world import config_digest

        theirs = config_digest({"config": config.to_dict(self.other), "data": {"sha256": "x"}})
        return [a + b for a, b in zip(values, [0.0] * 4 + theirs, strict=True)]


def test_ranks_with_another_config_are_named():
    from common.errors import UserError
    from common.options import TrainConfig
    from common.train.cmd import _check_same_config
    from common.train.world import World

    cfg = TrainConfig(model="m", lora_r=4)
    _check_same_config(_Gathered(cfg), World(0, 2), cfg, {"sha256": "x"})  # the same: no error
    with pytest.raises(UserError, match="rank 1 resolved a different configuration"):
        _check_same_config(_Gathered(TrainConfig(model="m", lora_r=8)), World(0, 2), cfg, {"sha256": "x"})


def test_ctrl_c_to_the_launcher_stops_every_rank_with_a_checkpoint(runs, tmp_path):
    # guards against a Ctrl-C that returned at once and left torchrun's ranks training, or a traceback storm
    import signal
    import time

    _, _, _, model, data = runs
    out = tmp_path / "run"
    args = train_args(model, data, out, 1, "--save-every", "0")
    args[args.index("--max-steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", *args, "--nproc", "2"], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and '"train"' in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(proc.communicate()[1][-3000:]) from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr
    assert "--resume" in stderr and "--nproc 2" in stderr.split("continue with:")[1]
    assert [p.name for p in (out / "checkpoints").iterdir()]
    assert _child_with("RANK", "1", proc.pid) is None


def _rank_alone(env_extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    """One rank of a 2-process job started by hand (as torchrun would), with a 3 s joining timeout."""
    env = {**_env(), "WORLD_SIZE": "2", "LOCAL_RANK": env_extra["RANK"], "LLM_FT_INIT_TIMEOUT_S": "3", **env_extra}
    cmd = [sys.executable, "-m", "common.cli", "train", "--model", str(tmp_path), "--backend", "torch",
           "--device", "cpu", "--out", str(tmp_path / "run")]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_an_unreachable_master_address_is_a_clear_error(tmp_path):
    proc = _rank_alone({"RANK": "1", "MASTER_ADDR": "192.0.2.1", "MASTER_PORT": "29555"}, tmp_path)  # TEST-NET-1
    assert proc.returncode != 0
    assert "rank 1: cannot join the job's process group at 192.0.2.1:29555 within 3 s" in proc.stderr
    assert "Traceback" not in proc.stderr and "frame #" not in proc.stderr  # c10d's C++ stacks are kept out
    assert not (tmp_path / "run").exists()


def test_a_master_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _rank_alone({"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, tmp_path)
    assert proc.returncode != 0
    assert f"rank 0: cannot join the job's process group at 127.0.0.1:{port}" in proc.stderr
    assert "address already in use" in proc.stderr and "Traceback" not in proc.stderr


def test_the_joining_timeout_comes_from_the_environment():
    from common.errors import UserError
    from common.train.world import INIT_TIMEOUT_S, init_timeout_s

    assert init_timeout_s({}) == INIT_TIMEOUT_S
    assert init_timeout_s({"LLM_FT_INIT_TIMEOUT_S": "2.5"}) == 2.5
    with pytest.raises(UserError, match="LLM_FT_INIT_TIMEOUT_S='soon': expected seconds"):
        init_timeout_s({"LLM_FT_INIT_TIMEOUT_S": "soon"})
