"""Data-parallel training on MLX: mlx.launch with 2 ring ranks over 127.0.0.1 against one process."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from test_distributed import STEPS, adapter, cut_back, run, train_args, train_rows  # noqa: E402
from tiny_run import copy_data  # noqa: E402

pytestmark = [pytest.mark.mlx, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def mlx_args(*args) -> list[str]:
    out = train_args(*args)
    out[out.index("torch")] = "mlx"
    i = out.index("--device")
    return out[:i] + out[i + 2:]  # a torch option


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("dist-mlx")
    data = copy_data(base / "data", train=12, valid=2, test=0)
    one, two = base / "one", base / "two"
    run(mlx_args(tiny_model_dir, data, one, 4))
    # mlx.launch -n 2 --backend ring
    proc = run([*mlx_args(tiny_model_dir, data, two, 2, "--save-every", "1"), "--nproc", "2"])
    return one, two, proc, tiny_model_dir, data


def test_two_mlx_ranks_equal_one_rank_with_grad_accum_doubled(runs):
    one, two, proc = runs[:3]
    a, b = train_rows(one), train_rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["world_size"] == 2
    wa, wb = adapter(one), adapter(two)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    assert proc.stdout.count("adapter: ") == 1  # rank 0 alone reports and writes


def test_rank_zero_alone_writes_every_mlx_artifact_once(runs):
    two, proc = runs[1:3]
    steps = [r["step"] for r in train_rows(two)]
    assert steps == sorted(set(steps))  # not one row per rank
    assert (two / "summary.json").is_file() and (two / "config.json").is_file() and (two / "loss.png").is_file()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert proc.stderr.count("training 3 steps") == 1


@pytest.mark.parametrize("nproc,grad_accum", [(1, 4), (2, 2)])
def test_a_two_rank_mlx_checkpoint_resumes_on_one_or_two_ranks(runs, tmp_path, nproc, grad_accum):
    _, two, _, model, data = runs
    out = cut_back(two, tmp_path / "run", 2)
    run([*mlx_args(model, data, out, grad_accum, "--save-every", "1", "--resume"), "--nproc", str(nproc)])
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3]
    assert train_rows(out)[-1]["loss"] == pytest.approx(train_rows(two)[-1]["loss"], rel=1e-5)
    wa, wb = adapter(two), adapter(out)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_a_killed_mlx_rank_ends_the_job_naming_it(runs, tiny_model_dir, tmp_path):
    from test_distributed import kill_a_rank

    data = runs[0].parent / "data"
    out = tmp_path / "run"
    args = mlx_args(tiny_model_dir, data, out, 2, "--save-every", "5")
    args[args.index("--max-steps") + 1] = "100000"
    result, seconds = kill_a_rank([*args, "--nproc", "2"], out, "MLX_RANK")
    assert result.returncode != 0
    assert seconds < 60
    assert "rank 1" in result.stderr, result.stderr[-3000:]
