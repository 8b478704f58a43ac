"""The Python API (``import llm_ft``): the CLI's options and validation, result objects, one exception type."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::FutureWarning")]

from tiny_run import copy_data, train_tiny  # noqa: E402

import llm_ft  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def api_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = copy_data(root / "data")
    result = train_tiny(tiny_model_dir, data, root / "runs" / "r1", max_steps=3, eval_every=2)
    return result, data


def test_train_returns_the_run(api_run):
    result, _ = api_run
    assert isinstance(result, llm_ft.TrainResult) and result.status == 0
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.summary["steps"] == 3 and result.summary["stop_reason"] == "completed"
    assert [s for s, _ in result.losses()] == [1, 2, 3]
    assert [s for s, _ in result.losses("eval")] == [2, 3]
    assert result.best_eval_loss == min(v for _, v in result.losses("eval"))
    written = json.loads((result.run_dir / "config.json").read_text())
    assert written["max_steps"] == 3 and written["lora_r"] == 4


def test_evaluate_gives_the_cli_metrics(api_run, tmp_path, capsys):
    from common.cli import main

    result, data = api_run
    opts = ["--data", str(data / "test.jsonl"), "--max-new-tokens", "8", "--no-loss"]
    got = llm_ft.evaluate(result.run_dir, data=str(data / "test.jsonl"), max_new_tokens=8, loss=False,
                          out=str(tmp_path / "api"))
    assert main(["eval", str(result.run_dir), *opts, "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert isinstance(got, llm_ft.EvalResult) and got.out_dir == tmp_path / "api"
    assert got.metrics == cli["metrics"] and got.report["samples"] == cli["samples"]
    assert got["n"] == 4


def test_errors_are_one_type_with_the_cli_message(tiny_model_dir, tmp_path, capsys):
    from common.cli import main

    with pytest.raises(llm_ft.LLMFTError) as api:
        llm_ft.train(model=str(tiny_model_dir), lora_r=0, out=str(tmp_path / "x"))
    assert main(["train", "--model", str(tiny_model_dir), "--lora-r", "0", "--out", str(tmp_path / "x")]) == 2
    assert f"error: {api.value.render()}" in capsys.readouterr().err
    assert "--lora-r: must be >= 1, got 0" in str(api.value)
    assert not (tmp_path / "x").exists()


def test_unknown_keyword_names_our_option(tiny_model_dir):
    # guards a TRL/HF spelling silently ignored: learning_rate must point to lr, not train at the default
    with pytest.raises(llm_ft.LLMFTError) as err:
        llm_ft.train(model=str(tiny_model_dir), learning_rate=1e-4, lora_rank=8)
    text = err.value.render()
    assert "learning_rate: unknown option (did you mean 'lr'?)" in text
    assert "lora_rank: unknown option (did you mean 'lora_r'?)" in text


def test_trust_remote_code_comes_from_the_call_only(tmp_path):
    from common.options import TrainConfig

    # A config file (a cloned folder's) may not turn the switch on: refused, naming the file and the way to opt in.
    opted = tmp_path / "opted.yaml"
    opted.write_text("trust_remote_code: true\nlora_r: 8\n")
    with pytest.raises(llm_ft.LLMFTError, match="pass --trust-remote-code"):
        llm_ft.build_config(TrainConfig, {}, config=str(opted))
    yaml = tmp_path / "run.yaml"
    yaml.write_text("lora_r: 8\n")
    cfg = llm_ft.build_config(TrainConfig, {}, config=str(yaml))
    assert cfg.lora_r == 8 and cfg.trust_remote_code is False
    assert llm_ft.build_config(TrainConfig, {"trust_remote_code": True}, config=str(yaml)).trust_remote_code


def test_chat_and_classify_answer_the_same(api_run):
    result, data = api_run
    answer = llm_ft.chat(result.run_dir, "set a timer for 5 minutes", max_new_tokens=12)
    one = llm_ft.classify(result.run_dir, "set a timer for 5 minutes", max_new_tokens=12,
                          json_schema=data / "schema.json")
    many = llm_ft.classify(result.run_dir, ["set a timer for 5 minutes", "play jazz"], max_new_tokens=12)
    assert isinstance(one, llm_ft.ClassifyResult) and one.answer == answer
    assert [r.text for r in many] == ["set a timer for 5 minutes", "play jazz"] and many[0].answer == answer
    assert one.ok == (one.data is not None and not one.problems)
    if one.data is None:  # a 3-step tiny model rarely writes JSON: then it says so
        assert one.problems == ["answer is not valid JSON"] and one.intent is None


def test_classify_parses_and_checks_json(monkeypatch, api_run):
    # the parsing half of classify on known answers (the generator is the real one above)
    from common import generation

    result, data = api_run
    answers = iter([['{"intent": "set_timer", "slots": {"duration": "5 minutes"}}', '{"intent": "fly"}', "nope"]])

    class Canned:
        def generate_batch(self, batch, **kw):
            return next(answers)

        def close(self):
            pass

    monkeypatch.setattr(generation, "load_generator", lambda *a, **k: Canned())
    good, bad, text = llm_ft.classify(result.run_dir, ["a", "b", "c"], json_schema=data / "schema.json")
    assert good.ok and good.intent == "set_timer" and good.data["slots"] == {"duration": "5 minutes"}
    assert not bad.ok and bad.intent == "fly" and any("'fly' is not one of" in p for p in bad.problems)
    assert text.data is None and text.problems == ["answer is not valid JSON"]


def test_merge_and_export(api_run, tmp_path):
    result, _ = api_run
    merged = llm_ft.merge(result.run_dir, out=str(tmp_path / "merged"))
    assert merged == tmp_path / "merged" and (merged / "config.json").is_file()
    exported = llm_ft.export(result.run_dir, quant="f32", verify=False, pre="gpt-2",
                             out=str(tmp_path / "x" / "model.gguf"))
    assert isinstance(exported, llm_ft.ExportResult)
    assert exported.gguf.is_file() and exported.modelfile.read_text().startswith("#")
    assert exported.verify is None and any("verif" in n or "parameters" in n for n in exported.notes)
