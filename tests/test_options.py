"""Option groups and their checks: ranges from field metadata (CLI, YAML and .env alike), security
switches that no file may turn on, and the train flags unchanged by the grouping."""

import dataclasses
import importlib
import math
import os

import pytest

from common import config
from common.cli import COMMANDS, main
from common.config import check, resolve
from common.errors import UserError
from common.options import LoRAOptions, OptimizerOptions, TorchOptions, TrainConfig, part

# The flat train options before they were grouped: names and defaults must not move.
TRAIN_FIELDS = {
    "allow_global_batch_change", "allow_partial_resume", "attention", "backend", "batch_size", "chat_template", "compile", "data", "device",
    "dtype", "early_stop_patience", "epochs", "eval_batches", "eval_every", "grad_accum", "grad_checkpoint",
    "group_by_length", "json_schema", "keep", "kernels", "load_in_4bit", "load_in_8bit", "log_every", "lora_alpha",
    "lora_dropout", "lora_r", "lr", "max_grad_norm", "max_memory", "max_seq_length", "max_steps", "memory_mode", "model", "nonfinite", "fsdp",
    "nproc", "num_layers", "optim", "out", "overlong", "packing", "report_to", "resume", "revision", "sample_prompts",
    "save_every", "schedule", "seed", "system_prompt_file", "targets", "train_on_prompt", "trust_remote_code",
    "use_dora", "use_rslora", "valid_fraction", "warmup_steps", "weight_decay",
} | {"data_config", "run_name", "wandb_project"}  # round 2's Hub datasets and trackers


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("LLM_FT_LR", "LLM_FT_EPOCHS", "LLM_FT_TRUST_REMOTE_CODE", "LLM_FT_HOST", "LLM_FT_SHARE_ON_NETWORK"):
        monkeypatch.setenv(key, "x")  # recorded, so teardown restores the real value (or its absence)
        monkeypatch.delenv(key)
    return tmp_path


def all_configs() -> list[type]:
    for module, _ in COMMANDS.values():
        importlib.import_module(module)
    return list(config._REGISTRY)


def required(cls) -> dict:
    """A value for each required (positional) field, so a config can be resolved."""
    return {f.name: "x" for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def test_train_config_is_its_groups_with_flat_names_and_defaults():
    from common.preference_options import PreferenceOptions  # added later (DPO/ORPO), as a group of its own

    added = {f.name for f in dataclasses.fields(PreferenceOptions)}
    assert {f.name for f in dataclasses.fields(TrainConfig)} == TRAIN_FIELDS | added
    cfg = TrainConfig(lora_r=8, lr=1e-3, kernels="off")
    assert part(cfg, LoRAOptions) == LoRAOptions(lora_r=8)
    assert part(cfg, OptimizerOptions).lr == 1e-3 and part(cfg, TorchOptions).kernels == "off"


@pytest.mark.parametrize("argv, flag, why", [
    (["--lr", "nan"], "--lr", "must be a finite number, got nan"),
    (["--lr", "inf"], "--lr", "must be a finite number, got inf"),
    (["--epochs", "nan"], "--epochs", "must be a finite number, got nan"),
    (["--lora-alpha", "-3"], "--lora-alpha", "must be > 0, got -3.0"),
    (["--lora-dropout", "1"], "--lora-dropout", "must be in [0, 1), got 1.0"),
    (["--batch-size", "0"], "--batch-size", "must be >= 1, got 0"),
])
def test_train_refuses_non_finite_and_out_of_range_flags(here, capsys, argv, flag, why):
    # Regression: --lr nan, --lr inf, --epochs nan passed the checks and --lora-alpha -3 trained.
    assert main(["train", "--out", str(here / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and f"{flag}: {why}" in err and "Traceback" not in err
    assert not (here / "run").exists()


def test_every_problem_of_every_layer_is_reported_at_once(here):
    (here / ".env").write_text("LLM_FT_EPOCHS=nan\n")
    (here / "run.yaml").write_text("lr: .inf\nlora_alpha: -3\nwarmup_steps: -1\n")
    with pytest.raises(UserError) as exc:
        resolve(TrainConfig, {"lora_dropout": "nan"}, str(here / "run.yaml"), cwd=here)
    assert exc.value.problems == [
        f"{here / '.env'}: LLM_FT_EPOCHS: must be a finite number, got nan",
        f"{here / 'run.yaml'}: lr: must be a finite number, got inf",
        f"{here / 'run.yaml'}: lora_alpha: must be > 0, got -3.0",
        f"{here / 'run.yaml'}: warmup_steps: must be >= 0, got -1",
        "--lora-dropout: must be a finite number, got nan",
    ]


def test_every_numeric_option_of_every_command_refuses_nan_and_values_below_its_range(here):
    checked = 0
    for cls in all_configs():
        types = config.hints(cls)
        for f in dataclasses.fields(cls):
            base, _ = config.unwrap_optional(types[f.name])
            if base not in (int, float):
                continue
            meta = f.metadata
            bad = ["nan", "inf"] if base is float else []
            low = meta["gt"] if meta["gt"] is not None else meta["min"]
            if low is not None:
                bad.append(str(low - 1 if meta["gt"] is None else low))
            for raw in bad:
                with pytest.raises(UserError) as exc:
                    resolve(cls, {**required(cls), f.name: raw}, cwd=here)
                assert any(p.startswith(f"{config.flag(f.name)}: must be") for p in exc.value.problems), (cls, f.name)
                checked += 1
    assert checked > 40  # the registry really was walked


def test_api_built_configs_are_checked_from_the_same_metadata():
    assert check(TrainConfig()) == []
    assert check(TrainConfig(lr=math.nan, lora_alpha=-3.0, load_in_4bit=True, load_in_8bit=True)) == [
        "lora_alpha: must be > 0, got -3.0", "lr: must be a finite number, got nan",
        "load_in_4bit and load_in_8bit: choose one"]


# ---------------------------------------------------------------------------
# security switches


def test_env_file_cannot_turn_on_trust_remote_code(here, capsys):
    # Regression: LLM_FT_TRUST_REMOTE_CODE=1 in ./.env made train import a model folder's Python code.
    (here / ".env").write_text("LLM_FT_TRUST_REMOTE_CODE=1\n")
    with pytest.raises(UserError) as exc:
        resolve(TrainConfig, cwd=here)
    (problem,) = exc.value.problems
    assert problem.startswith(f"{here / '.env'}: LLM_FT_TRUST_REMOTE_CODE: True is refused from a file")
    assert "pass --trust-remote-code on the command line" in problem
    assert main(["train", "--out", str(here / "run")]) == 2
    assert "LLM_FT_TRUST_REMOTE_CODE" in capsys.readouterr().err and not (here / "run").exists()
    # a file that keeps the switch off is fine, and the flag (or the API call) turns it on
    (here / ".env").write_text("LLM_FT_TRUST_REMOTE_CODE=0\n")
    assert resolve(TrainConfig, cwd=here).trust_remote_code is False
    assert resolve(TrainConfig, {"trust_remote_code": True}, cwd=here).trust_remote_code is True


def test_yaml_cannot_turn_on_trust_remote_code(here):
    (here / "run.yaml").write_text("trust_remote_code: true\n")
    with pytest.raises(UserError) as exc:
        resolve(TrainConfig, {}, str(here / "run.yaml"), cwd=here)
    assert exc.value.problems[0].startswith(f"{here / 'run.yaml'}: trust_remote_code: True is refused from a file")


def test_env_file_cannot_expose_serve_beyond_loopback(here, capsys):
    # Regression: LLM_FT_HOST=0.0.0.0 + LLM_FT_SHARE_ON_NETWORK=1 in ./.env made serve listen on all interfaces.
    from common.serve import ServeConfig

    (here / ".env").write_text("LLM_FT_HOST=0.0.0.0\nLLM_FT_SHARE_ON_NETWORK=1\n")
    with pytest.raises(UserError) as exc:
        resolve(ServeConfig, {"target": "x"}, cwd=here)
    assert [p.split(":")[1].strip() for p in exc.value.problems] == ["LLM_FT_HOST", "LLM_FT_SHARE_ON_NETWORK"]
    assert all("refused from a file" in p for p in exc.value.problems)
    assert main(["serve", "default"]) == 2
    err = capsys.readouterr().err
    assert "--host on the command line" in err and "--share-on-network on the command line" in err
    (here / ".env").write_text("LLM_FT_HOST=localhost\nLLM_FT_PORT=8000\n")  # loopback stays allowed
    cfg = resolve(ServeConfig, {"target": "x"}, cwd=here)
    assert (cfg.host, cfg.port, cfg.share_on_network) == ("localhost", 8000, False)
    cfg = resolve(ServeConfig, {"target": "x", "host": "0.0.0.0", "share_on_network": True}, cwd=here)
    assert (cfg.host, cfg.share_on_network) == ("0.0.0.0", True)


def test_every_security_switch_is_marked(here):
    # Any option named like a code-running or exposing switch must be command-line only.
    marked = {(cls.__name__, f.name) for cls in all_configs() for f in dataclasses.fields(cls)
              if f.metadata.get("cli_only")}
    names = {f.name for cls in all_configs() for f in dataclasses.fields(cls)}
    risky = {n for n in names if "trust" in n or "remote_code" in n or n in ("host", "share_on_network", "share")}
    assert risky <= {name for _, name in marked}
    assert ("ServeConfig", "host") in marked and ("TrainConfig", "trust_remote_code") in marked


def test_env_file_cannot_pass_a_library_trust_switch_to_the_environment(here, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_TRUST_REMOTE_CODE", raising=False)
    (here / ".env").write_text("HF_DATASETS_TRUST_REMOTE_CODE=1\n")
    with pytest.raises(UserError) as exc:
        resolve(TrainConfig, cwd=here)
    assert exc.value.problems[0].startswith(f"{here / '.env'}: HF_DATASETS_TRUST_REMOTE_CODE: refused from a file")
    assert "HF_DATASETS_TRUST_REMOTE_CODE" not in os.environ


def test_parent_directory_env_cannot_opt_in(here):
    (here / ".env").write_text("LLM_FT_TRUST_REMOTE_CODE=1\n")
    child = here / "clone"
    child.mkdir()
    assert resolve(TrainConfig, cwd=child).trust_remote_code is False


def test_quant_choices_and_template_names_come_from_their_one_table(capsys):
    from typing import get_args

    from common.export import gguf_file
    from common.export.cmd import Quant
    from common.prompts import NAMED_TEMPLATES

    assert get_args(Quant) == gguf_file.QUANTS
    for command in ("train", "eval", "chat"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert ", ".join(NAMED_TEMPLATES) in " ".join(capsys.readouterr().out.split())


def test_print_config_leaves_out_switches_a_file_cannot_set(here, capsys):
    # the printed YAML is meant as a -c file, which would be refused with the switch in it
    assert main(["train", "--trust-remote-code", "--lr", "1e-3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (here / "run.yaml").write_text(printed)
    cfg = resolve(TrainConfig, {}, str(here / "run.yaml"), cwd=here)
    assert cfg.lr == 1e-3 and cfg.trust_remote_code is False
    assert "# trust_remote_code: left out; pass --trust-remote-code on the command line" in printed
