"""Pure parts of training: schedule, batching/packing, checkpoints on disk, configs, flags. No model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import resolve
from common.errors import UserError
from common.options import TrainConfig
from common.rows import Example
from common.train import checkpoint as ckpts
from common.train.batching import DataStream, Position, epoch_plan, eval_plan, make_batch, pack
from common.train.schedule import lr_at


def ex(n: int, answer: int = 2, base: int = 10) -> Example:
    return Example(list(range(base, base + n)), [0] * (n - answer) + [1] * answer)


# -- schedule -------------------------------------------------------------------------------


def test_schedule_warmup_then_linear_to_zero():
    lrs = [lr_at(s, peak=1.0, warmup=4, total=14, kind="linear") for s in range(14)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_schedule_cosine_and_constant():
    assert lr_at(5, peak=2.0, warmup=0, total=10, kind="cosine") == pytest.approx(1.0)
    assert lr_at(9, peak=2.0, warmup=3, total=10, kind="constant") == 2.0


# -- batching -------------------------------------------------------------------------------


def test_pad_batch_masks_padding_and_first_token():
    b = make_batch([[ex(5)], [ex(3, answer=3)]], pad_id=0)
    assert b.input_ids[1] == [10, 11, 12, 0, 0]
    assert b.segment_ids == [[1] * 5, [1, 1, 1, 0, 0]]
    assert b.loss_mask[1] == [0, 1, 1, 0, 0]  # the row's first token is never a target
    assert (b.n_tokens, b.n_supervised) == (8, 4)


def test_packed_row_restarts_positions_and_never_targets_a_segment_start():
    # A Text-style example supervises every token: packed after another, its first token
    # must not be learnt from the previous example (cross-example target).
    b = make_batch([[ex(3), Example([7, 8, 9], [1, 1, 1])]], pad_id=0)
    assert b.segment_ids == [[1, 1, 1, 2, 2, 2]]
    assert b.position_ids == [[0, 1, 2, 0, 1, 2]]
    assert b.loss_mask == [[0, 1, 1, 0, 1, 1]]
    assert b.n_supervised == 4


def test_pack_fills_rows_without_exceeding_max_len():
    lengths = [5, 4, 3, 6, 2, 8]
    rows = pack(range(6), lengths, 8)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert len(rows) == 4  # 28 tokens in rows of 8: the minimum


def test_epoch_plan_is_seeded_complete_and_groups_lengths():
    lengths = [3 + (i * 7) % 40 for i in range(200)]
    plan = epoch_plan(lengths, batch_size=4, seed=1, epoch=0)
    assert plan == epoch_plan(lengths, batch_size=4, seed=1, epoch=0)
    assert plan != epoch_plan(lengths, batch_size=4, seed=1, epoch=1)
    assert sorted(r[0] for b in plan for r in b) == list(range(200))
    spread = sum(max(lengths[r[0]] for r in b) - min(lengths[r[0]] for r in b) for b in plan) / len(plan)
    assert spread < 3  # sorted inside windows: a batch holds rows of similar length
    assert eval_plan(lengths, batch_size=4)[0] == [[i] for i in sorted(range(200), key=lambda i: -lengths[i])[:4]]


def test_stream_resumes_at_a_position():
    examples = [ex(4 + i % 5) for i in range(10)]
    a = DataStream(examples, batch_size=3, seed=0, pad_id=0)
    seen = [a.next()[1] for _ in range(9)]  # crosses into the second epoch (4 batches per epoch)
    b = DataStream(examples, batch_size=3, seed=0, pad_id=0, position=Position(1, 1))
    assert [b.next()[1] for _ in range(4)] == seen[5:]
    assert a.micro_batches_for(2.5) == 10


# -- checkpoints on disk ------------------------------------------------------------------------


def _write(run: Path, step: int, state_files=("optimizer.bin",)) -> Path:
    def files(tmp: Path) -> list[str]:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "w.safetensors").write_bytes(b"x" * 100 + bytes([step]))
        for f in state_files:
            (tmp / f).write_bytes(b"state")
        return list(state_files)

    return ckpts.write(run, step, files, {"step": step}, {"lora_r": 8})


def test_checkpoint_verify_detects_truncation_and_skips_to_previous(tmp_path):
    for s in (2, 4, 6):
        _write(tmp_path, s)
    assert ckpts.verify(ckpts.checkpoint_dir(tmp_path, 6)) == []
    target = ckpts.checkpoint_dir(tmp_path, 6) / "adapter" / "w.safetensors"
    target.write_bytes(target.read_bytes()[:50])
    warnings: list[str] = []
    assert ckpts.newest_verified(tmp_path, warnings.append) == ckpts.checkpoint_dir(tmp_path, 4)
    assert len(warnings) == 1 and "step-6" in warnings[0] and "truncated" in warnings[0]


def test_checkpoint_missing_manifest_is_partial(tmp_path):
    path = _write(tmp_path, 3)
    (path / "manifest.json").unlink()
    assert "incomplete" in ckpts.verify(path)[0]


def test_missing_optional_state_still_verifies(tmp_path):
    path = _write(tmp_path, 3)
    (path / "optimizer.bin").unlink()
    assert ckpts.verify(path) == []  # the resume decides (refused unless --allow-partial-resume)
    (path / "trainer_state.json").unlink()
    assert "missing" in ckpts.verify(path)[0]


def test_rotation_keeps_newest_and_the_last_verified(tmp_path):
    for s in (1, 2, 3, 4):
        _write(tmp_path, s)
    ckpts.rotate(tmp_path, keep=2, newest_good=ckpts.checkpoint_dir(tmp_path, 2))
    assert [s for s, _ in ckpts.steps(tmp_path)] == [4, 3, 2]
    ckpts.rotate(tmp_path, keep=1, newest_good=ckpts.checkpoint_dir(tmp_path, 4))
    assert [s for s, _ in ckpts.steps(tmp_path)] == [4]
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_incompatible_checkpoint_lists_every_mismatch(tmp_path):
    path = _write(tmp_path, 1)
    with pytest.raises(UserError) as err:
        ckpts.check_compatible(path, {"lora_r": 16, "targets": ["q_proj"]})
    assert len(err.value.problems) == 2
    assert any(p.startswith("lora_r: checkpoint has 8, this run has 16") for p in err.value.problems)


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoints" / ".step-9.abc.tmp").mkdir(parents=True)
    (tmp_path / ".adapter.xyz.tmp").mkdir()
    ckpts.remove_stale(tmp_path)
    assert list(tmp_path.rglob(".*")) == []


# -- configs and flags ---------------------------------------------------------------------------


def test_example_configs_are_generated_and_resolve(tmp_path):
    from common.train import configs

    written = configs.write_all(tmp_path)
    assert {p.name for p in written} == {f"{n}.yaml" for n in configs.EXAMPLES}
    for p in written:
        committed = configs.CONFIG_DIR / p.name
        assert committed.read_text() == p.read_text(), f"{committed} is stale: run python -m common.train.configs"
        resolve(TrainConfig, {}, str(p), cwd=tmp_path)
    llama = resolve(TrainConfig, {}, str(tmp_path / "unsloth-llama3.yaml"), cwd=tmp_path)
    assert (llama.lora_r, llama.lora_alpha, llama.lr, llama.batch_size, llama.grad_accum, llama.warmup_steps,
            llama.max_steps, llama.optim, llama.weight_decay, llama.schedule, llama.seed) == \
        (16, 16.0, 2e-4, 2, 4, 5, 60, "adamw_8bit", 0.01, "linear", 3407)
    assert len(llama.targets) == 7
    m1 = resolve(TrainConfig, {}, str(tmp_path / "intent-classifier-m1.yaml"), cwd=tmp_path)
    assert (m1.epochs, m1.batch_size, m1.grad_accum, m1.warmup_steps, m1.eval_every, m1.save_every, m1.keep) == \
        (3.0, 2, 8, 100, 100, 50, 5)
    q = resolve(TrainConfig, {}, str(tmp_path / "qlora-nf4.yaml"), cwd=tmp_path)
    assert q.load_in_4bit and q.dtype == "bfloat16"


def test_print_config_and_validation(capsys, tmp_path, monkeypatch):
    import yaml

    from common.train.cmd import main

    monkeypatch.chdir(tmp_path)
    assert main(["--model", "m", "--max-steps", "7", "--targets", "q_proj,v_proj", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["max_steps"] == 7 and printed["targets"] == ["q_proj", "v_proj"]
    assert main(["--batch-size", "0", "--eval-every", "-1", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size: must be >= 1" in err and "--eval-every: must be >= 0" in err


def test_train_help_is_complete(capsys):
    from common.train.cmd import build_parser

    text = build_parser().format_help()
    for flag in ("--model", "--data", "--system-prompt-file", "--out", "--backend", "--epochs", "--max-steps",
                 "--batch-size", "--grad-accum", "--lr", "--warmup-steps", "--schedule", "--weight-decay", "--optim",
                 "--max-seq-length", "--lora-r", "--lora-alpha", "--lora-dropout", "--targets", "--use-dora",
                 "--use-rslora", "--load-in-4bit", "--grad-checkpoint", "--eval-every", "--save-every", "--keep",
                 "--early-stop-patience", "--seed", "--resume", "--packing", "--report-to", "--print-config",
                 "--allow-partial-resume", "--nonfinite"):
        assert flag in text, flag
    json.dumps(text)
