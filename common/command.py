"""Glue between the config dataclasses and argparse: flags, grouped help, hints for mistyped flags.

Flags are generated from the dataclasses (:func:`add_arguments`); :class:`Parser` adds a
"did you mean" to an unknown flag, and knows the names Hugging Face, Unsloth and mlx-lm
users type (``--learning_rate``, ``--num_train_epochs``...).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args, get_origin

from common import config
from common.cli import run_command
from common.errors import nearest

# Flag names of other trainers (transformers' TrainingArguments, TRL, Unsloth, mlx-lm, PEFT)
# -> ours. Only hints: a hint is shown when its target exists in the parser at hand.
FOREIGN_FLAGS: dict[str, str] = {
    "learning_rate": "lr", "lora_rank": "lora_r", "rank": "lora_r", "r": "lora_r",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "iters": "max_steps",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "per_device_eval_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "grad_accumulation": "grad_accum",
    "max_seq_len": "max_seq_length", "max_length": "max_seq_length", "cutoff_len": "max_seq_length",
    "sequence_len": "max_seq_length",
    "output_dir": "out", "adapter_path": "out", "model_name": "model", "model_name_or_path": "model",
    "base_model": "model", "target_modules": "targets", "lora_target_modules": "targets",
    "gradient_checkpointing": "grad_checkpoint", "use_gradient_checkpointing": "grad_checkpoint",
    "lr_scheduler_type": "schedule", "lr_scheduler": "schedule", "warmup": "warmup_steps",
    "logging_steps": "log_every", "steps_per_report": "log_every",
    "eval_steps": "eval_every", "steps_per_eval": "eval_every", "val_batches": "eval_batches",
    "save_steps": "save_every", "save_total_limit": "keep", "resume_from_checkpoint": "resume",
    "dataset": "data", "train_file": "data", "dataset_text_field": "data", "data_path": "data",
    "chat_template_path": "chat_template", "bf16": "dtype", "fp16": "dtype",
    "quantization": "quant", "quantization_method": "quant",
}


# (foreign flag, value) -> our flag and value: Unsloth's use_gradient_checkpointing="unsloth" is its
# offloaded checkpointing, our --memory-mode offload.
FOREIGN_VALUES: dict[tuple[str, str], tuple[str, str]] = {
    ("use_gradient_checkpointing", "unsloth"): ("memory_mode", "offload"),
    ("gradient_checkpointing", "unsloth"): ("memory_mode", "offload"),
}


def flag_hint(flag: str, known: Sequence[str], value: str | None = None) -> str | None:
    """The flag a user most likely meant by the unknown ``flag`` (e.g. ``--learning_rate`` -> ``--lr``);
    ``value`` (or ``flag=value``) picks a value-specific hint (``--use_gradient_checkpointing unsloth``)."""
    known = list(known)
    name, _, inline = flag.lstrip("-").partition("=")
    key = name.replace("-", "_").lower()
    ours = FOREIGN_VALUES.get((key, (inline or value or "").strip("\"'").lower()))
    if ours and config.flag(ours[0]) in known:
        return f"{config.flag(ours[0])} {ours[1]}"
    # ours spelt with underscores (--max_seq_length, --no_packing), then a foreign name
    for candidate in (key, FOREIGN_FLAGS.get(key), FOREIGN_FLAGS.get(key.removeprefix("lora_"))):
        if candidate and config.flag(candidate) in known:
            return config.flag(candidate)
    foreign = nearest(key, FOREIGN_FLAGS)  # a misspelt foreign name: --learnin_rate
    if foreign and config.flag(FOREIGN_FLAGS[foreign]) in known:
        return config.flag(FOREIGN_FLAGS[foreign])
    # compared without the leading "--", which would make every pair of short flags look alike
    close = nearest(key.replace("_", "-"), [k[2:] for k in known if k.startswith("--")])
    return f"--{close}" if close else None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose "unrecognized arguments" error names the flag meant, and whose
    errors are one ``error:`` line (not the whole usage, ~40 lines for train)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n  run '{self.prog} --help' for the options\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        unknown = [a for a in extras if a.startswith("-") and not _is_number(a)]
        if unknown and self._subparsers is None:
            known = [s for action in self._actions for s in action.option_strings]
            lines = []
            for a in unknown:
                after = extras[extras.index(a) + 1:extras.index(a) + 2]
                hint = flag_hint(a, known, after[0] if after else None)
                lines.append(f"unknown option {a.split('=', 1)[0]}" + (f" (did you mean {hint}?)" if hint else ""))
            self.error("; ".join(lines))
        return parsed, extras


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _help(f: dataclasses.Field, base, default) -> str:
    """A field's help with its default shown, escaped for argparse (which %-formats help strings)."""
    text = f.metadata.get("help", "")
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if base is bool:
        text = f"{text} (default: {'on' if default else 'off'})"
    elif default not in (None, "", []):
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{text} (default: {shown})"
    elif "default" not in text and not required:  # the help does not already say what an unset value means
        text = f"{text} (default: none)"
    if f.metadata.get("cli_only"):
        text += " [command line only: never read from .env or YAML]"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per field of ``cls`` (kebab-case), help and defaults from the dataclass.

    Flags are flat (``--lora-r``), listed under the title of the option group that declares
    them (a dataclass's ``GROUP``), so ``--help`` reads as sections.
    """
    types_ = config.hints(cls)
    groups: dict[str | None, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        tp = types_[f.name]
        base, _ = config.unwrap_optional(tp)
        default = config.default_of(f)
        title = None if meta.get("positional") else config.group_title(cls, f.name)
        if title not in groups:
            groups[title] = parser if title is None else parser.add_argument_group(title)
        target = groups[title]
        kwargs: dict[str, Any] = {"help": _help(f, base, default), "default": argparse.SUPPRESS}
        if get_origin(base) is Literal:
            kwargs["choices"] = list(get_args(base))
        if meta.get("positional"):
            if get_origin(base) is list:
                nargs = "*" if default is not None else "+"
            else:
                nargs = "?" if f.default is not dataclasses.MISSING else None
            target.add_argument(f.name, nargs=nargs, metavar=f.name.upper(), default=argparse.SUPPRESS,
                                help=kwargs["help"])
            continue
        names = [config.flag(f.name)]
        if meta.get("short"):
            names.insert(0, meta["short"])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is list:
            kwargs["metavar"] = "A,B,..."
        elif "choices" not in kwargs:
            kwargs["metavar"] = f.name.upper()
        target.add_argument(*names, dest=f.name, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand shares: the config file, the .env file, --debug."""
    group = parser.add_argument_group("configuration files")
    group.add_argument("-c", "--config", metavar="FILE.yaml", default=None,
                       help="YAML file of settings; command-line flags override it (default: none)")
    group.add_argument("--env-file", metavar="PATH", default=None,
                       help="a .env file (default: ./.env if present; parent directories are never read). "
                            "LLM_FT_* keys set options; HF_TOKEN and other library keys go to the environment")
    group.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: off)")
    group.add_argument("--verbose", action="store_true", help="show the libraries' own warnings, logs and "
                       "progress bars (default: hidden)")


def from_args(cls, args: argparse.Namespace):
    """Resolve ``cls`` from a parsed namespace made with :func:`add_arguments` + :func:`add_config_arguments`."""
    ns = vars(args)
    cli = {k: v for k, v in ns.items() if k not in ("config", "env_file", "debug", "verbose", "command", "func")}
    return config.resolve(cls, cli, ns.get("config"), ns.get("env_file"))


def make_parser(prog: str, description: str, cfg_cls=None) -> argparse.ArgumentParser:
    parser = Parser(prog=f"llm-ft {prog}", description=description)
    if cfg_cls is not None:
        add_arguments(parser, cfg_cls)
    add_config_arguments(parser)
    return parser


def main_for(build_parser: Callable[[], argparse.ArgumentParser], cfg_cls, run: Callable,
             argv: Sequence[str] | None, extra: Callable[[argparse.Namespace, object], int | None] | None = None) -> int:
    """Parse ``argv`` with ``build_parser``, resolve ``cfg_cls`` and call ``run(cfg)``."""
    args = build_parser().parse_args(argv)

    def body():
        cfg = from_args(cfg_cls, args)
        if extra is not None:
            handled = extra(args, cfg)
            if handled is not None:
                return handled
        return run(cfg)

    return run_command(body, getattr(args, "debug", False))
