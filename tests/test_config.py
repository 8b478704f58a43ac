"""Configuration: precedence defaults < .env < YAML < CLI, errors that name key/file, secrets kept out."""

import dataclasses
import json
import os

import pytest

from common.command import from_args, make_parser
from common.config import opt, resolve, to_dict, to_yaml
from common.errors import UserError
from common.options import TrainConfig


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("LLM_FT_LR", "LLM_FT_EPOCHS", "LLM_FT_BATCH_SIZE", "HF_TOKEN", "HF_HOME"):
        monkeypatch.setenv(key, "x")  # recorded, so teardown restores the real value (or its absence)
        monkeypatch.delenv(key)
    return tmp_path


def test_defaults(here):
    cfg = resolve(TrainConfig, cwd=here)
    assert cfg.lr is None and cfg.peak_lr == 2e-4 and cfg.batch_size == 4 and cfg.data == ["data"] and cfg.backend == "auto"


def test_precedence_defaults_env_yaml_cli(here):
    (here / ".env").write_text("LLM_FT_LR=1e-3\nLLM_FT_EPOCHS=5\nLLM_FT_BATCH_SIZE=2\n")
    (here / "run.yaml").write_text("lr: 5e-4\nbatch_size: 8\ntargets: [q_proj, v_proj]\n")
    cfg = resolve(TrainConfig, {"lr": "1e-5"}, str(here / "run.yaml"), cwd=here)
    assert cfg.lr == 1e-5  # CLI beats YAML
    assert cfg.batch_size == 8  # YAML beats .env
    assert cfg.epochs == 5.0  # .env beats the default
    assert cfg.lora_r == 16  # default
    assert cfg.targets == ["q_proj", "v_proj"]


def test_cli_flags_through_argparse(here):
    (here / "run.yaml").write_text("batch_size: 8\nuse_dora: true\n")
    parser = make_parser("train", "test", TrainConfig)
    args = parser.parse_args(["-c", str(here / "run.yaml"), "--no-use-dora", "--lr", "3e-4",
                              "--targets", "q_proj,o_proj", "--data", "a.jsonl:10,b"])
    cfg = from_args(TrainConfig, args)
    assert (cfg.batch_size, cfg.use_dora, cfg.lr) == (8, False, 3e-4)
    assert cfg.targets == ["q_proj", "o_proj"] and cfg.data == ["a.jsonl:10", "b"]


def test_yaml_scientific_notation_is_a_float(here):
    # regression: YAML 1.1 reads 2e-4 (no dot) as a string; it must still be accepted as a float
    (here / "run.yaml").write_text("lr: 2e-4\n")
    assert resolve(TrainConfig, {}, str(here / "run.yaml"), cwd=here).lr == 2e-4


def test_yaml_unquoted_on_off_is_the_choice_not_a_boolean(here):
    # regression: YAML 1.1 reads `compile: off` as False; it must mean the choice "off"
    (here / "run.yaml").write_text("compile: on\nkernels: off\n")
    cfg = resolve(TrainConfig, {}, str(here / "run.yaml"), cwd=here)
    assert (cfg.compile, cfg.kernels) == ("on", "off")
    (here / "run.yaml").write_text("kernels: on\n")  # no "on" among the kernels choices: still an error
    with pytest.raises(UserError) as err:
        resolve(TrainConfig, {}, str(here / "run.yaml"), cwd=here)
    assert "kernels: expected one of 'auto', 'liger', 'native', 'off', got True" in str(err.value.problems)


def test_env_file_never_overrides_the_real_environment(here, monkeypatch):
    (here / ".env").write_text("LLM_FT_LR=0.1\nHF_TOKEN=from-file\nHF_HOME=/from/file\n")
    monkeypatch.setenv("LLM_FT_LR", "0.5")
    monkeypatch.setenv("HF_TOKEN", "real")
    cfg = resolve(TrainConfig, cwd=here)
    assert cfg.lr == 0.5
    assert os.environ["HF_TOKEN"] == "real"
    assert os.environ["HF_HOME"] == "/from/file"  # absent from the environment: the file's value is used


def test_parent_directory_env_is_never_read(here):
    (here / ".env").write_text("LLM_FT_LR=0.9\n")
    child = here / "project"
    child.mkdir()
    assert resolve(TrainConfig, cwd=child).lr is None  # the default, not the parent directory's 0.9
    with pytest.raises(UserError, match="not found"):
        resolve(TrainConfig, env_file=str(child / ".env"), cwd=child)


def test_unknown_yaml_keys_name_file_and_nearest_key(here):
    (here / "run.yaml").write_text("batch_sise: 8\nlearning_rat: 1\nlr: 1e-3\n")
    with pytest.raises(UserError) as exc:
        resolve(TrainConfig, {}, str(here / "run.yaml"), cwd=here)
    assert exc.value.problems == [f"{here / 'run.yaml'}: unknown key 'batch_sise' (did you mean 'batch_size'?)",
                                  f"{here / 'run.yaml'}: unknown key 'learning_rat'"]


def test_unknown_env_keys_name_file_and_nearest_key(here):
    (here / ".env").write_text("LLM_FT_BATCH_SISE=8\nBATCH_SIZE=8\n")
    with pytest.raises(UserError) as exc:
        resolve(TrainConfig, cwd=here)
    env = here / ".env"
    assert exc.value.problems[0] == f"{env}: unknown key 'LLM_FT_BATCH_SISE' (did you mean 'LLM_FT_BATCH_SIZE'?)"
    assert exc.value.problems[1].startswith(f"{env}: unknown key 'BATCH_SIZE' (did you mean 'LLM_FT_BATCH_SIZE'?)")


def test_wrong_types_name_key_and_expected_type(here):
    (here / ".env").write_text("LLM_FT_EPOCHS=three\n")
    (here / "run.yaml").write_text("batch_size: four\nuse_dora: 1\nbackend: tourch\n")
    with pytest.raises(UserError) as exc:
        resolve(TrainConfig, {"lora_r": "x"}, str(here / "run.yaml"), cwd=here)
    assert exc.value.problems == [
        f"{here / '.env'}: LLM_FT_EPOCHS: expected float, got str 'three'",
        f"{here / 'run.yaml'}: batch_size: expected int, got str 'four'",
        f"{here / 'run.yaml'}: use_dora: expected bool, got int 1",
        f"{here / 'run.yaml'}: backend: expected one of 'auto', 'torch', 'mlx', got 'tourch' (did you mean 'torch'?)",
        "--lora-r: expected int, got str 'x'",
    ]


def test_validation_problems_collected(here):
    with pytest.raises(UserError) as exc:
        resolve(TrainConfig, {"batch_size": 0, "lr": -1.0, "valid_fraction": 1.5}, cwd=here)
    assert exc.value.problems == ["--batch-size: must be >= 1, got 0", "--lr: must be > 0, got -1.0",
                                  "--valid-fraction: must be in [0, 1), got 1.5"]


def test_secrets_reach_the_environment_but_never_the_config(here):
    (here / ".env").write_text("HF_TOKEN=hf_secret_value\nLLM_FT_LR=1e-3\n")
    cfg = resolve(TrainConfig, cwd=here)
    assert os.environ["HF_TOKEN"] == "hf_secret_value"
    assert "hf_secret_value" not in json.dumps(to_dict(cfg)) and "hf_secret_value" not in to_yaml(cfg)
    assert "HF_TOKEN" not in to_yaml(cfg)
    assert to_dict(cfg)["lr"] == 1e-3


def test_secret_looking_fields_are_dropped_from_output():
    @dataclasses.dataclass
    class WithSecret:
        hub_token: str = opt("hf_abc", "a token")
        api_key: str = opt("k", "a key")
        name: str = opt("n", "a name")

    assert to_dict(WithSecret()) == {"name": "n"}
    assert "hf_abc" not in to_yaml(WithSecret())


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    # Regression: mkstemp's 0600 leaked into exported files, which Ollama's service user could not read.
    from common import io

    old = os.umask(0o022)
    try:
        io.write_text(tmp_path / "Modelfile", "FROM x\n")
        with io.atomic_dir(tmp_path / "adapter") as d:
            (d / "a.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "Modelfile").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
