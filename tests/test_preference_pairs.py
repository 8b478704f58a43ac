"""Learn from mistakes end to end (torch, tiny model): eval --pairs -> DPO from the run's adapter -> eval ->
export -> verify in llama.cpp."""

from __future__ import annotations

import json

import pytest
from test_eval import UNSEEN, tiny_run  # noqa: F401  (the module's fixture: a trained run and its test data)

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_pairs_from_errors_skip_what_cannot_be_a_pair():
    from common.evaluate.pairs import pairs_from_errors

    errors = [{"prompt": "hi", "messages": None, "expected": "a", "produced": "b"},
              {"prompt": "hi", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
               "expected": "a", "produced": "c"},
              {"prompt": "hi", "messages": None, "expected": "a", "produced": "  "}]
    pairs, skipped = pairs_from_errors(errors)
    assert skipped == 1
    assert pairs[0] == {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    assert pairs[1]["prompt"][0]["role"] == "system"


def test_eval_pairs_then_one_dpo_round(tiny_run, tiny_model_dir, monkeypatch, tmp_path):  # noqa: F811
    from common.data import load_file
    from common.evaluate.cmd import main as eval_main
    from common.train.cmd import main as train_main

    root, run, _ = tiny_run
    monkeypatch.chdir(root)
    pairs = tmp_path / "pairs" / "train.jsonl"
    assert eval_main([str(run), "--max-new-tokens", "40", "--out", str(tmp_path / "eval0"),
                      "--pairs", str(pairs)]) == 0
    rows, report = load_file(pairs)
    assert report.ok and report.formats[str(pairs)] == "preference" and len(rows) == 1  # the one wrong answer
    assert rows[0].prompt[-1]["content"] == UNSEEN[0] and json.loads(rows[0].chosen) == UNSEEN[1]
    (pairs.parent / "valid.jsonl").write_text(pairs.read_text())
    (tmp_path / "system.txt").write_text("Answer with JSON.\n")
    dpo = tmp_path / "dpo"
    assert train_main(["--method", "dpo", "--data", str(pairs.parent), "--init-adapter", str(run),
                       "--model", str(tiny_model_dir), "--out", str(dpo), "--max-steps", "3", "--lr", "1e-3",
                       "--warmup-steps", "0", "--sample-prompts", "0", "--batch-size", "1",
                       "--system-prompt-file", str(tmp_path / "system.txt")]) == 0
    assert (dpo / "adapter" / "adapter_model.safetensors").exists()
    assert eval_main([str(dpo), "--data", str(root / "data" / "test.jsonl"), "--max-new-tokens", "40"]) == 0
    m = json.loads((dpo / "eval" / "metrics.json").read_text())["metrics"]
    assert m["n"] == 4 and m["parse_rate"] > 0
    pytest.importorskip("llama_cpp")
    from common.export.cmd import main as export_main

    # the DPO run exports and verifies in llama.cpp like any run (tokens and logits against the trained model)
    assert export_main([str(dpo), "--quant", "f32", "--out", str(tmp_path / "m.gguf"), "--pre", "gpt-2",
                        "--verify-prompts", "1", "--max-new-tokens", "2"]) == 0
    assert json.loads((tmp_path / "verify.json").read_text())["passed"] is True
