"""``--fsdp``: FSDP2 on 2 gloo ranks on the CPU shards the frozen base and trains what one process does.

The LoRA weights are whole on every rank and their gradients summed as under plain data
parallelism, so 2 FSDP ranks x grad_accum g must equal 1 process x grad_accum 2g to fp32 noise,
evaluation (3 batches over 2 ranks: one rank pads) and checkpoints included.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from test_distributed import _env, adapter, cut_back, run, train_args, train_rows  # noqa: E402
from tiny_run import REPO, copy_data  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# eval at step 2 and at the end, one greedy sample each time: the forwards every rank must make alike
EVAL = ("--eval-every", "2", "--sample-prompts", "1")


def eval_rows(out) -> list[float]:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if r["event"] == "eval"]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    data = copy_data(base / "data", train=12, valid=3, test=0)
    one, two = base / "one", base / "two"
    run(train_args(tiny_model_dir, data, one, 4, *EVAL))
    proc = run([*train_args(tiny_model_dir, data, two, 2, *EVAL, "--save-every", "1"), "--nproc", "2", "--fsdp"])
    return one, two, proc, tiny_model_dir, data


def test_fsdp_on_two_ranks_equals_one_process_with_grad_accum_doubled(fsdp_runs):
    one, two, proc = fsdp_runs[:3]
    assert "sharded over 2 ranks" in proc.stderr  # the base really was sharded, not silently replicated
    a, b = train_rows(one), train_rows(two)
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["world_size"] == 2
    assert len(eval_rows(two)) == 2
    assert eval_rows(two) == pytest.approx(eval_rows(one), rel=1e-5)
    wa, wb = adapter(one), adapter(two)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    assert max(float(v.abs().max()) for k, v in wb.items() if "lora_B" in k) > 0  # it did train
    assert proc.stderr.count("sample 1:") == 2  # every rank generated, rank 0 alone printed


def test_an_fsdp_checkpoint_resumes_under_fsdp(fsdp_runs, tmp_path):
    _, two, _, model, data = fsdp_runs
    out = cut_back(two, tmp_path / "run", 2)
    run([*train_args(model, data, out, 2, *EVAL, "--save-every", "1", "--resume"), "--nproc", "2", "--fsdp"])
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3]
    assert train_rows(out)[-1]["loss"] == pytest.approx(train_rows(two)[-1]["loss"], rel=1e-5)
    wa, wb = adapter(two), adapter(out)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_fsdp_in_one_process_is_refused(tiny_model_dir, tmp_path):
    data = copy_data(tmp_path / "data", train=4, valid=0, test=0)
    cmd = [sys.executable, "-m", "common.cli", *train_args(tiny_model_dir, data, tmp_path / "run", 1), "--fsdp"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--fsdp shards the base model over the processes" in proc.stderr and "--nproc" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_fsdp_on_mlx_is_refused():
    from common.errors import UserError
    from common.train.cmd import _check_fsdp
    from common.train.world import World

    with pytest.raises(UserError, match="--fsdp: sharding the base .* is a torch option; the mlx backend"):
        _check_fsdp("mlx", 2, World())
    _check_fsdp("torch", 1, World(0, 2, 0, "torchrun"))  # under torchrun: accepted
