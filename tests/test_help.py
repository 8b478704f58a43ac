"""Every help screen renders (no argparse internals), groups train's options, shows every default,
and a mistyped or foreign (Hugging Face, Unsloth) flag gets the name it meant."""

import pytest

from common.cli import COMMANDS, main
from common.command import add_arguments, flag_hint, make_parser
from common.models.cmd import ACTIONS
from common.options import TrainConfig

MODELS_ACTIONS = list(ACTIONS)


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    return out


@pytest.mark.parametrize("argv", [[], ["--help"]] + [[name, "--help"] for name in COMMANDS] +
                         [["models", action, "--help"] for action in MODELS_ACTIONS])
def test_every_help_screen_renders(argv, capsys):
    # Regression: an unescaped % ("~30% slower") printed argparse's internal dict in train --help.
    out = help_text(argv, capsys)
    assert "{'option_strings'" not in out and "%(" not in out and "%%" not in out


def test_train_help_is_grouped_and_escapes_percent(capsys):
    out = help_text(["train", "--help"], capsys)
    sections = [line[:-1] for line in out.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert sections == ["options", "model", "data", "LoRA", "training method", "optimiser", "training loop", "memory and speed",
                        "backend and device", "torch backend", "output", "configuration files"]
    assert "~30% slower" in " ".join(out.split())


def test_every_train_option_shows_its_default():
    parser = make_parser("train", "test")
    add_arguments(parser, TrainConfig)
    options = [a for a in parser._actions if a.dest in {f for f in TrainConfig.__dataclass_fields__}]
    assert len(options) == len(TrainConfig.__dataclass_fields__)
    assert [a.dest for a in options if "default" not in a.help] == []


@pytest.mark.parametrize("typed, meant", [
    ("--learning_rate", "--lr"), ("--learning-rate", "--lr"), ("--lora_rank", "--lora-r"),
    ("--num_train_epochs", "--epochs"), ("--per_device_train_batch_size", "--batch-size"),
    ("--gradient_accumulation_steps", "--grad-accum"), ("--max_seq_length", "--max-seq-length"),
    ("--lora_alpha", "--lora-alpha"), ("--output_dir", "--out"), ("--target_modules", "--targets"),
    ("--gradient_checkpointing", "--grad-checkpoint"), ("--lr_scheduler_type", "--schedule"),
    ("--iters", "--max-steps"), ("--bach-size", "--batch-size"), ("--use_dora", "--use-dora"),
])
def test_mistyped_and_foreign_flags_name_ours(typed, meant, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", typed, "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown option {typed} (did you mean {meant}?)" in err and "Traceback" not in err


def test_hints_only_name_flags_the_command_has(capsys):
    assert flag_hint("--learning_rate", ["--lr"]) == "--lr"
    assert flag_hint("--learning_rate", ["--temperature"]) is None
    with pytest.raises(SystemExit) as exc:
        main(["models", "info", "--lora_rank", "4"])  # a subcommand's subparser gives hints too
    assert exc.value.code == 2 and "did you mean --lora-r?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "x", "--max_new_tokens=5"])
    assert exc.value.code == 2 and "did you mean --max-new-tokens?" in capsys.readouterr().err


def test_a_flag_error_is_one_error_line_not_the_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--backend", "tourch"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: llm-ft train: argument --backend: invalid choice")
    assert "usage:" not in err and err.count("\n") == 2
