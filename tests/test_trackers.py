"""Trackers: a tiny run logs to W&B (offline) and TensorBoard; the metrics are read back from their files
under the names TRL users know (train/loss, train/learning_rate, train/grad_norm, eval/loss)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from tiny_run import copy_data, train_tiny  # noqa: E402


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte W&B header, then LevelDB's log format (32 KiB blocks,
    each record a 7-byte header: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, buf, block = 7, [], b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    return out


def wandb_run(run_dir: Path) -> tuple[dict, dict[int, dict]]:
    """(run record fields, {step: history row}) of the offline W&B run under ``run_dir/wandb``."""
    from wandb.proto import wandb_internal_pb2 as pb

    (file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    info, history = {}, {}
    for raw in wandb_records(file):
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info = {"name": r.run.display_name, "project": r.run.project, "id": r.run.run_id}
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(int(row["_step"]), {}).update(row)
    return info, history


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    import os

    root = tmp_path_factory.mktemp("trackers")
    data = copy_data(root / "data")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    try:
        result = train_tiny(tiny_model_dir, data, root / "runs" / "tracked", max_steps=4, eval_every=2,
                            report_to=["wandb", "tensorboard"], run_name="tiny-intent", wandb_project="llm-ft-tests")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return result


def test_wandb_offline_run_has_the_trl_metric_names(tracked_run):
    info, history = wandb_run(tracked_run.run_dir)
    assert info["name"] == "tiny-intent" and info["project"] == "llm-ft-tests"
    train = [e for e in tracked_run.metrics if e["event"] == "train"]
    evals = [e for e in tracked_run.metrics if e["event"] == "eval"]
    assert [e["step"] for e in train] == [1, 2, 3, 4] and [e["step"] for e in evals] == [2, 4]
    for e in train:
        row = history[e["step"]]
        assert row["train/loss"] == pytest.approx(e["loss"])
        assert row["train/learning_rate"] == pytest.approx(e["lr"])
        assert row["train/grad_norm"] == pytest.approx(e["grad_norm"])
    for e in evals:
        assert history[e["step"]]["eval/loss"] == pytest.approx(e["eval_loss"])


def test_tensorboard_event_files_hold_the_same_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run.run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= tags
    loss = {s.step: s.value for s in acc.Scalars("train/loss")}
    assert loss == pytest.approx({s: v for s, v in tracked_run.losses()})
    assert {s.step: s.value for s in acc.Scalars("eval/loss")} == pytest.approx(dict(tracked_run.losses("eval")))


def test_report_to_none_and_missing_tracker(monkeypatch, tiny_model_dir):
    import importlib.util

    import llm_ft
    from common.train import trackers

    assert trackers.selected(["none"]) == [] and trackers.selected(["wandb", "none"]) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(llm_ft.LLMFTError, match=r"--report-to wandb: not installed; pip install 'llm-ft\[wandb\]'"):
        trackers.check_installed(["wandb"])
    with pytest.raises(llm_ft.LLMFTError, match="--report-to: expected one of 'none', 'wandb', 'tensorboard', got 'mlflow'"):
        llm_ft.build_config(__import__("common.options").options.TrainConfig, {"report_to": ["mlflow"]})
