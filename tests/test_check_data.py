"""`llm-ft check-data`: exit codes, every problem listed, token statistics with a tiny tokenizer."""

import json
from pathlib import Path

import pytest

from common.check_data import CheckDataConfig, check, main, run
from common.errors import UserError


def chat(user, answer, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_rows(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def clean_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no system_prompt.txt or .env of the repo is picked up
    d = tmp_path / "data"
    intents = ["set_timer", "play_music", "unknown"]
    write_rows(d / "train.jsonl", [chat(f"please do thing {i}", json.dumps({"intent": intents[i % 3]}))
                                   for i in range(9)])
    write_rows(d / "valid.jsonl", [chat("valid thing", '{"intent": "set_timer"}')])
    return d


def test_clean_data_exits_0(clean_dir, capsys):
    assert main([str(clean_dir), "--no-tokens", "--system-prompt-file", ""]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "valid" in out and "ok: 0 errors, 0 warnings" in out
    assert "set_timer" in out  # the intents table


def test_errors_exit_2_and_every_problem_is_listed(clean_dir, capsys):
    bad = write_rows(clean_dir.parent / "bad.jsonl", [chat("a", "b"), '{"messages": [', chat("c", ""),
                                                      {"mesages": []}])
    code = main([str(clean_dir), str(bad), "--no-tokens", "--system-prompt-file", ""])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 problems in the data")
    assert f"{bad}:2:15: invalid JSON" in err
    assert f"{bad}:3: messages[1].content: empty content" in err
    assert f"{bad}:4: unknown key 'mesages' (did you mean 'messages'?)" in err
    assert "Traceback" not in err


def test_run_raises_user_error_with_first_50_then_count(clean_dir, capsys):
    write_rows(clean_dir / "test.jsonl", ["{oops"] * 55)
    cfg = CheckDataConfig(paths=[str(clean_dir)], tokens=False, system_prompt_file=None)
    with pytest.raises(UserError) as exc:
        run(cfg)
    assert len(exc.value.problems) == 55
    text = exc.value.render()
    assert "test.jsonl:50:2: invalid JSON" in text and "test.jsonl:51:2" not in text and "... and 5 more" in text


def test_warnings_alone_exit_0(clean_dir, capsys):
    write_rows(clean_dir / "test.jsonl", [chat("please do thing 0", '{"intent": "set_timer"}'),
                                          chat("q", {"intent": "unknown"})])
    assert main([str(clean_dir), "--no-tokens", "--system-prompt-file", ""]) == 0
    out = capsys.readouterr().out
    assert "same prompt and answer as train row" in out and "leakage into test" in out
    assert "converted to JSON text" in out and "ok: 0 errors, 2 warnings" in out


def test_schema_and_missing_system_prompt_are_errors(clean_dir, capsys):
    (clean_dir / "schema.json").write_text(json.dumps({"properties": {"intent": {"enum": ["set_timer"]}}}))
    with pytest.raises(UserError) as exc:
        run(CheckDataConfig(paths=[str(clean_dir)], tokens=False, system_prompt_file="nope.txt"))
    problems = exc.value.problems
    assert problems[0].startswith("nope.txt: system prompt file not found")
    assert f"{clean_dir / 'train.jsonl'}:2: answer does not match schema.json: 'play_music' is not one of" in problems[1]
    assert len(problems) == 1 + 6  # 3 play_music + 3 unknown in train


def test_paths_default_to_the_data_option(clean_dir):
    result = check(CheckDataConfig(tokens=False, system_prompt_file=None))  # cwd has data/
    assert len(result.splits.train) == 9 and result.report.ok
    assert result.intents["train"] == {"set_timer": 3, "play_music": 3, "unknown": 3}


def test_token_stats_skipped_when_no_tokenizer_can_be_had(clean_dir, capsys):
    code = main([str(clean_dir), "--model", str(clean_dir / "no-such-model"), "--system-prompt-file", ""])
    assert code == 0
    out = capsys.readouterr().out
    assert "warning: token statistics skipped:" in out and "no-such-model" in out


def test_token_stats_with_tiny_model(clean_dir, tiny_model_dir, capsys):
    prompt = clean_dir.parent / "system.txt"
    prompt.write_text("You are an intent classifier. Answer with JSON only.\n")
    base = CheckDataConfig(paths=[str(clean_dir)], model=str(tiny_model_dir), system_prompt_file=None)
    plain = check(base)
    assert plain.tokens_skipped is None and plain.report.ok
    s = plain.stats["train"]
    assert s["rows"] == 9 and 0 < s["tokens_p50"] <= s["tokens_p95"] <= s["tokens_max"] < 1024
    assert s["supervised_tokens"] > 0 and s["zero_supervised"] == 0 and s["overlong"] == 0
    with_system = check(CheckDataConfig(paths=[str(clean_dir)], model=str(tiny_model_dir),
                                        system_prompt_file=str(prompt)))
    # the system prompt is inserted into every row: more tokens, same supervised tokens
    assert with_system.stats["train"]["tokens_p50"] > s["tokens_p50"]
    assert with_system.stats["train"]["supervised_tokens"] == s["supervised_tokens"]

    # overlong rows are never silent: truncate warns, error lists the rows and exits 2
    short = s["tokens_max"] - 1
    code = main([str(clean_dir), "--model", str(tiny_model_dir), "--system-prompt-file", "",
                 "--max-seq-length", str(short)])
    out = capsys.readouterr().out
    assert code == 0 and "rows are longer than max_seq_length" in out and "truncated" in out
    code = main([str(clean_dir), "--model", str(tiny_model_dir), "--system-prompt-file", "",
                 "--max-seq-length", str(short), "--overlong", "error"])
    err = capsys.readouterr().err
    assert code == 2 and f"{clean_dir / 'train.jsonl'}:" in err and "(--overlong error)" in err


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--no-tokens", "--json-schema", "--max-seq-length", "--overlong", "--model", "--data",
                 "--system-prompt-file", "PATHS"):
        assert flag in out
