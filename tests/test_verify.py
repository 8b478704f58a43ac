"""Verification has teeth: a wrong pre-tokenizer, wrong weights and a double BOS are
caught; the report is written and the command exits non-zero; the embedded SmolLM2
end to end (slow)."""

from __future__ import annotations

import json

import pytest

from common.export.cmd import ExportConfig, main, run

pytestmark = [pytest.mark.llama, pytest.mark.torch]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    from test_merge import make_run

    return make_run(tmp_path_factory.mktemp("verify"), "llama")


def test_wrong_pre_tokenizer_is_caught(run_dir, tmp_path):
    # llama-bpe splits digits into groups of three, the tiny tokenizer (GPT-2 regex) does not
    out = tmp_path / "m.gguf"
    code = main([str(run_dir), "--quant", "f32", "--out", str(out), "--pre", "llama-bpe", "--verify-prompts", "1",
                 "--max-new-tokens", "2"])
    assert code == 1
    assert not out.exists()  # nothing published: the failed export is kept beside for inspection
    report = json.loads((tmp_path / "m.failed" / "verify.json").read_text())
    assert report["passed"] is False
    assert any("0123456789" in m["text"] for m in report["tokens"]["mismatches"])


def test_wrong_weights_fail_f32_but_are_only_measured_for_q8_0(run_dir, tmp_path, monkeypatch):
    import common.export.arch as arch

    # regression guard: without llama's Q/K row permutation llama.cpp computes a different model
    monkeypatch.setitem(arch.ARCHS, "llama", arch.ARCHS["llama"].__class__(
        **{**arch.ARCHS["llama"].__dict__, "permute_qk": False}))
    bad = run(ExportConfig(source=str(run_dir), quant="f32", out=str(tmp_path / "f32.gguf"), pre="gpt-2",
                           verify_prompts=1, max_new_tokens=2))
    assert not bad.report.passed and bad.report.logits["nmse_max"] > 1e-3
    q8 = run(ExportConfig(source=str(run_dir), quant="q8_0", out=str(tmp_path / "q8.gguf"), pre="gpt-2",
                          verify_prompts=1, max_new_tokens=2))
    assert q8.report.passed and q8.report.logits["limit"] is None  # quantised: reported, not judged


def test_double_bos_is_caught(run_dir, tmp_path, monkeypatch):
    import common.export.verify as verify

    # a template that writes the BOS text itself while llama.cpp also adds one must be flagged
    monkeypatch.setattr(verify, "strip_template_bos", lambda text, formatter: formatter.special["bos_token"] + text)
    res = run(ExportConfig(source=str(run_dir), quant="f32", out=str(tmp_path / "m.gguf"), pre="gpt-2",
                           verify_prompts=1, max_new_tokens=2))
    assert not res.report.passed
    assert res.report.tokens["prompt_problems"]


def test_passing_report(run_dir, tmp_path):
    out = tmp_path / "m.gguf"
    assert main([str(run_dir), "--quant", "f16", "--out", str(out), "--pre", "gpt-2", "--verify-prompts", "2",
                 "--max-new-tokens", "3"]) == 0
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["passed"] and report["logits"]["nmse_max"] < 1e-4 and report["logits"]["top1_agreement"] == 1.0
    assert report["tokens"]["mismatches"] == [] and report["greedy"]["prompts"] >= 1


# ---------------------------------------------------------------------------
# the embedded default model, end to end


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    """SmolLM2-135M: merge (random adapter) + export f16 + verify, then q8_0 vs q4_0 damage."""
    pytest.importorskip("llama_cpp")
    from test_merge import make_run
    from tiny import write_chat_jsonl

    from common.models import resolve_model

    base = resolve_model("default").path
    rd = make_run(tmp_path, base=base, b_std=0.002)
    rows = [("set a timer for ten minutes", '{"intent": "set_timer"}'), ("play some jazz", '{"intent": "play_music"}'),
            ("what's the weather in Paris tomorrow?", '{"intent": "get_weather"}')]
    write_chat_jsonl(tmp_path / "data" / "train.jsonl", rows * 4)
    write_chat_jsonl(tmp_path / "data" / "test.jsonl", rows)
    cfg = json.loads((rd / "config.json").read_text()) | {"data": [str(tmp_path / "data")]}
    (rd / "config.json").write_text(json.dumps(cfg))

    f16 = run(ExportConfig(source=str(rd), quant="f16", verify_prompts=3, max_new_tokens=24))
    rep = f16.report
    assert rep.passed, rep.failures
    assert rep.logits["nmse_max"] < 1e-4
    assert rep.tokens["mismatches"] == []  # pre-tokenizer recognised as smollm, no --pre needed
    assert rep.greedy["agreement"] >= 2 / 3

    numbers = {}
    for quant in ("q8_0", "q4_0"):  # measured on the rendered prompts: NMSE, top-1, greedy agreement
        rep = run(ExportConfig(source=str(rd), quant=quant, verify_prompts=3, max_new_tokens=24)).report
        assert rep.tokens["mismatches"] == []
        numbers[quant] = (rep.logits["nmse_max"], rep.logits["top1_agreement"], rep.greedy["agreement"])
    print("SmolLM2-135M quantisation damage (NMSE max, top-1, greedy agreement):", numbers)
    assert numbers["q8_0"][0] < numbers["q4_0"][0]
