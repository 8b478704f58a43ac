"""``llm-ft train --method dpo|orpo`` end to end on the tiny model (torch, CPU): data, loop, metrics, resume."""

from __future__ import annotations

import json
import shutil

import pytest
from test_train_loop import ROWS, SYSTEM, events, quiet, same_tensors

pytestmark = pytest.mark.torch
pytest.importorskip("torch")
pytest.importorskip("peft")

from common.data import load_file  # noqa: E402
from common.options import TrainConfig  # noqa: E402
from common.train.cmd import run  # noqa: E402

WRONG = '{"intent": "unknown", "slots": {}}'


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
    """Pairs as prompt/chosen/rejected (train) and as TRL's two conversations (valid)."""
    d = tmp_path_factory.mktemp("pairs")
    train = [{"prompt": u, "chosen": a, "rejected": WRONG if a != WRONG else '{"intent": "play_music"}'}
             for u, a in ROWS]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    valid = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
             for r in train[:2]]
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    (d / "system.txt").write_text(SYSTEM + "\n")
    return d


def config(model_dir, data_dir, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=[str(data_dir)], system_prompt_file=str(data_dir / "system.txt"),
                out=str(out), max_steps=4, batch_size=2, lr=5e-3, warmup_steps=0, eval_every=2, save_every=2,
                keep=3, sample_prompts=0, seed=7, method="dpo")
    base.update(kw)
    return TrainConfig(**base)


def test_lint_names_file_and_line_for_bad_pairs(tmp_path):
    f = tmp_path / "bad.jsonl"
    rows = [{"prompt": "hi", "chosen": "a", "rejected": "b"},
            {"prompt": "hi", "chosen": "same", "rejected": "same"},
            {"prompt": "hi", "chosen": "", "rejected": "b"},
            {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, report = load_file(f)
    assert len(got) == 1 and report.formats[str(f)] == "preference"
    assert [e.split(": ", 1)[0] for e in report.errors] == [f"{f}:2", f"{f}:3", f"{f}:4"]
    assert "same answer" in report.errors[0] and "empty" in report.errors[1] and "one prompt" in report.errors[2]


def test_dpo_from_an_sft_adapter_logs_trl_metrics(tiny_model_dir, pref_dir, tmp_path):
    from tiny import write_chat_jsonl

    sft_data = tmp_path / "sft"
    write_chat_jsonl(sft_data / "train.jsonl", ROWS)
    write_chat_jsonl(sft_data / "valid.jsonl", ROWS[:2])
    (sft_data / "system.txt").write_text(SYSTEM + "\n")
    assert run(config(tiny_model_dir, sft_data, tmp_path / "sft-run", method="sft"), console=quiet()) == 0
    out = tmp_path / "dpo"
    cfg = config(tiny_model_dir, pref_dir, out, init_adapter=str(tmp_path / "sft-run"), ref="init-adapter",
                 precompute_ref=True)
    assert run(cfg, console=quiet()) == 0
    train = events(out, "train")
    assert len(train) == 4
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert all(key in e for e in train), key
    # the reference is the initial adapter: at step 1 the policy is the reference, so every reward is 0
    assert train[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    last = events(out, "eval")[-1]  # it learns to prefer the chosen answers of the held-out pairs
    assert last["eval_rewards/margins"] > 0 and last["eval_loss"] < 0.69
    assert (out / "reference_logps.json").exists() and (out / "loss.png").exists()


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_resume_gives_the_same_adapter(tiny_model_dir, pref_dir, tmp_path, method):
    a = tmp_path / "a"
    assert run(config(tiny_model_dir, pref_dir, a, method=method), console=quiet()) == 0
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-4")  # as if killed between steps 2 and 4
    assert run(config(tiny_model_dir, pref_dir, b, method=method, resume=True), console=quiet()) == 0
    assert same_tensors(a / "checkpoints/step-4/adapter/adapter_model.safetensors",
                        b / "checkpoints/step-4/adapter/adapter_model.safetensors")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_model_dir, pref_dir, tmp_path):
    """A real DPO process killed (SIGKILL) after a checkpoint resumes to the uninterrupted run's adapter."""
    import signal

    from test_train_signals import assert_bitwise, spawn, train_losses, wait_until

    from common.train import checkpoint as ckpts

    # dropout draws from the RNG each step and the reference cache is reused on resume: both must survive
    settings = dict(max_steps=24, batch_size=2, lr=5e-3, warmup_steps=2, lora_dropout=0.1, eval_every=6,
                    save_every=3, keep=2, sample_prompts=0, seed=5, method="dpo", precompute_ref=True)
    reference = tmp_path / "reference"
    assert run(config(tiny_model_dir, pref_dir, reference, **settings), console=quiet()) == 0

    killed = tmp_path / "killed"
    args = ["--model", str(tiny_model_dir), "--data", str(pref_dir), "--out", str(killed),
            "--system-prompt-file", str(pref_dir / "system.txt"), "--precompute-ref"]
    for k, v in settings.items():
        if k != "precompute_ref":
            args += [f"--{k.replace('_', '-')}", str(v)]
    proc = spawn(args)
    wait_until(lambda: (killed / "checkpoints" / "step-3" / ckpts.MANIFEST).exists(), proc)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    assert run(config(tiny_model_dir, pref_dir, killed, resume=True, **settings), console=quiet()) == 0

    assert_bitwise(reference / "adapter/adapter_model.safetensors", killed / "adapter/adapter_model.safetensors")
    for name in ("adapter/adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert_bitwise(reference / f"checkpoints/step-24/{name}", killed / f"checkpoints/step-24/{name}")
    assert train_losses(killed) == train_losses(reference)
    metrics = [{k: v for k, v in e.items() if k.startswith(("rewards/", "logps/"))} for e in events(killed, "train")]
    assert metrics == [{k: v for k, v in e.items() if k.startswith(("rewards/", "logps/"))}
                       for e in events(reference, "train")]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_two_ranks_log_the_global_dpo_metrics(tiny_model_dir, pref_dir, tmp_path):
    """2 gloo ranks x grad_accum 2 log what 1 rank x grad_accum 4 logs: rewards/logps are summed over ranks."""
    from test_distributed import run as launch
    from test_distributed import train_args, train_rows

    from common.train.methods import METRICS

    extra = ("--method", "dpo", "--precompute-ref", "--system-prompt-file", str(pref_dir / "system.txt"))
    one, two = tmp_path / "one", tmp_path / "two"
    launch(train_args(tiny_model_dir, pref_dir, one, 4, *extra))
    launch([*train_args(tiny_model_dir, pref_dir, two, 2, *extra), "--nproc", "2"])
    a, b = train_rows(one), train_rows(two)
    assert len(a) == len(b) == 3 and all(r["world_size"] == 2 for r in b)
    for x, y in zip(a, b, strict=True):
        for key in METRICS:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    ea, eb = events(one, "eval")[-1], events(two, "eval")[-1]
    for key in METRICS:
        assert eb["eval_" + key] == pytest.approx(ea["eval_" + key], rel=1e-5, abs=1e-6), key
    cache_a, cache_b = (json.loads((d / "reference_logps.json").read_text()) for d in (one, two))
    assert cache_b["train"]["key"] == cache_a["train"]["key"]
    flat = [[x for pair in c["train"]["logps"] for x in pair] for c in (cache_a, cache_b)]
    assert flat[1] == pytest.approx(flat[0], rel=1e-6)


def test_dpo_defaults_to_a_small_learning_rate(tiny_model_dir, pref_dir, tmp_path):
    # 5e-4 (the small-model SFT default) and 1e-4 made DPO on data/ worse; 2e-5 improved it (data/README.md)
    from common.options import DPO_LR, SMALL_MODEL_LR
    from common.train.cmd import with_default_lr

    dpo = with_default_lr(config(tiny_model_dir, pref_dir, tmp_path / "a", lr=None), tiny_model_dir, quiet())
    sft = with_default_lr(config(tiny_model_dir, pref_dir, tmp_path / "b", lr=None, method="sft"), tiny_model_dir,
                          quiet())
    assert dpo.peak_lr == DPO_LR == 2e-5 and sft.peak_lr == SMALL_MODEL_LR
    given = with_default_lr(config(tiny_model_dir, pref_dir, tmp_path / "c", lr=1e-3), tiny_model_dir, quiet())
    assert given.peak_lr == 1e-3
