"""Configuration: dataclasses are the single source of truth for defaults and help.

Precedence, lowest first: dataclass defaults < ``.env`` (``LLM_FT_*`` keys) < YAML
(``-c run.yaml``) < command-line flags. Every subcommand declares one dataclass with
:func:`opt` fields; :func:`add_arguments` turns it into argparse flags and
:func:`resolve` merges the layers, collecting every problem before raising.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from common.errors import UserError, nearest

ENV_PREFIX = "LLM_FT_"
# Keys a .env may carry for libraries (tokens, caches, devices). They go to the
# process environment, never into a config, a log or a run directory.
ENV_PASSTHROUGH_PREFIXES = ("HF_", "HUGGING_FACE_", "WANDB_", "CUDA_", "HSA_", "HIP_", "ROCR_",
                            "PYTORCH_", "OLLAMA_", "TOKENIZERS_", "OMP_", "MLX_", "TRANSFORMERS_")
SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, positional: bool = False,
        factory=None, short: str | None = None, cli: bool = True):
    """A config field: its default and help text live here and only here."""
    meta = {"help": help, "choices": choices, "positional": positional, "short": short, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_secret(key: str) -> bool:
    k = key.upper()
    return k.endswith(SECRET_SUFFIXES) or k in {"HF_TOKEN", "WANDB_API_KEY"}


# ---------------------------------------------------------------------------
# types


def _unwrap_optional(tp):
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, optional = _unwrap_optional(tp)
    if get_origin(base) is Literal:
        name = " | ".join(repr(a) for a in get_args(base))
    elif get_origin(base) is list:
        name = f"list of {_type_name(get_args(base)[0])}"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp, *, from_text: bool) -> Any:
    """Convert ``value`` to ``tp``; raise ValueError with the expected type's name.

    ``from_text`` is True for .env and CLI strings, where "3" may become 3; YAML values
    keep their own types, except that an int is accepted where a float is expected.
    """
    base, optional = _unwrap_optional(tp)
    if value is None or (from_text and optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
        if optional:
            return None
        raise ValueError(f"expected {_type_name(tp)}, got null")
    origin = get_origin(base)
    if origin is Literal:
        allowed = get_args(base)
        if isinstance(value, bool) and ("on" if value else "off") in allowed:
            value = "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as a boolean
        if value not in allowed:
            hint = nearest(str(value), [str(a) for a in allowed])
            extra = f" (did you mean {hint!r}?)" if hint else ""
            raise ValueError(f"expected one of {', '.join(map(repr, allowed))}, got {value!r}{extra}")
        return value
    if origin is list:
        (item_tp,) = get_args(base)
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [coerce(v, item_tp, from_text=from_text) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"expected bool, got {type(value).__name__} {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ValueError(f"expected int, got bool {value!r}")
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"expected int, got {type(value).__name__} {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"expected float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 as a string (YAML 1.1); accept numeric text
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected float, got {type(value).__name__} {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected str, got {type(value).__name__} {value!r}")
    return value


# ---------------------------------------------------------------------------
# argparse


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per field of ``cls`` (kebab-case), help and defaults from the dataclass."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        tp = hints[f.name]
        base, _ = _unwrap_optional(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = meta.get("help", "")
        if default not in (None, "", []) and base is not bool:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text = f"{help_text} (default: {shown})"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if get_origin(base) is Literal:
            kwargs["choices"] = list(get_args(base))
        if meta.get("positional"):
            kwargs.pop("default")
            if get_origin(base) is list:
                parser.add_argument(f.name, nargs="*" if default is not None else "+",
                                    metavar=f.name.upper(), default=argparse.SUPPRESS, help=kwargs["help"])
            else:
                nargs = "?" if f.default is not dataclasses.MISSING else None
                parser.add_argument(f.name, nargs=nargs, metavar=f.name.upper(),
                                    default=argparse.SUPPRESS, help=kwargs["help"])
            continue
        names = [f"--{f.name.replace('_', '-')}"]
        if meta.get("short"):
            names.insert(0, meta["short"])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = f"{help_text} (default: {'on' if default else 'off'})"
        elif get_origin(base) is list:
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["metavar"] = f.name.upper() if "choices" not in kwargs else None
            if kwargs["metavar"] is None:
                kwargs.pop("metavar")
        parser.add_argument(*names, dest=f.name, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand shares: the config file, the .env file, --debug."""
    parser.add_argument("-c", "--config", metavar="FILE.yaml", default=None,
                        help="YAML file of settings; command-line flags override it")
    parser.add_argument("--env-file", metavar="PATH", default=None,
                        help="a .env file (default: ./.env if present; parent directories are never read). "
                             "LLM_FT_* keys set options; HF_TOKEN and other library keys go to the environment")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own warnings, logs and "
                        "progress bars (hidden by default: common/quiet.py)")


# ---------------------------------------------------------------------------
# layers


def read_env_file(path: Path, cls) -> dict[str, str]:
    """Read a .env: LLM_FT_* keys become config values; library keys go to os.environ.

    The real environment always wins over the file. Unknown keys are errors naming the
    nearest valid key.
    """
    from dotenv import dotenv_values

    values = dotenv_values(path)
    names = {f.name for f in dataclasses.fields(cls)}
    all_names = _all_config_names()
    out: dict[str, str] = {}
    problems = []
    for key, value in values.items():
        if value is None:
            continue
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower()
            if name in names:
                env_value = os.environ.get(key)
                out[name] = env_value if env_value is not None else value
            elif name not in all_names:  # a key for another subcommand is fine
                hint = nearest(name, sorted(all_names))
                problems.append(f"{path}: unknown key {key!r}" +
                                (f" (did you mean {ENV_PREFIX + hint.upper()!r}?)" if hint else ""))
        elif key.startswith(ENV_PASSTHROUGH_PREFIXES) or is_secret(key):
            os.environ.setdefault(key, value)
        else:
            hint = nearest(key.lower().removeprefix("llm_ft_"), sorted(all_names))
            suggestion = f" (did you mean {ENV_PREFIX + hint.upper()!r}?)" if hint else ""
            problems.append(f"{path}: unknown key {key!r}{suggestion}; options use the {ENV_PREFIX} prefix, "
                            f"library keys start with one of {', '.join(ENV_PASSTHROUGH_PREFIXES[:4])}...")
    if problems:
        raise UserError(f"{path}: invalid .env file", problems)
    return out


def read_yaml_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_REGISTRY: list[type] = []


def register(cls):
    """Class decorator: make a config known, so a key of another subcommand is not 'unknown'."""
    _REGISTRY.append(cls)
    return cls


def _all_config_names() -> set[str]:
    names = set()
    for cls in _REGISTRY:
        names |= {f.name for f in dataclasses.fields(cls)}
    return names


def resolve(cls, cli: dict[str, Any] | None = None, config_file: str | None = None,
            env_file: str | None = None, *, cwd: Path | None = None):
    """Build ``cls`` from defaults < .env < YAML < CLI, reporting every problem at once."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    problems: list[str] = []

    env_path = Path(env_file) if env_file else (cwd or Path.cwd()) / ".env"
    if env_file and not env_path.exists():
        raise UserError(f"{env_path}: .env file not found")
    if env_path.exists():
        for name, raw in read_env_file(env_path, cls).items():
            try:
                values[name] = coerce(raw, hints[name], from_text=True)
            except ValueError as exc:
                problems.append(f"{env_path}: {ENV_PREFIX}{name.upper()}: {exc}")

    if config_file:
        path = Path(config_file)
        all_names = _all_config_names() | set(fields)
        for name, raw in read_yaml_file(path).items():
            if name not in fields:
                if name not in all_names:
                    hint = nearest(name, sorted(fields))
                    problems.append(f"{path}: unknown key {name!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
                continue
            try:
                values[name] = coerce(raw, hints[name], from_text=False)
            except ValueError as exc:
                problems.append(f"{path}: {name}: {exc}")

    for name, raw in (cli or {}).items():
        if name not in fields:
            continue
        try:
            values[name] = coerce(raw, hints[name], from_text=isinstance(raw, str) or
                                  (isinstance(raw, list) and all(isinstance(v, str) for v in raw)))
        except ValueError as exc:
            problems.append(f"--{name.replace('_', '-')}: {exc}")

    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"missing required option {name!r}")
    if problems:
        raise UserError("invalid configuration", problems)
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if check is not None:
        found = check()
        if found:
            raise UserError("invalid configuration", found)
    return cfg


def from_args(cls, args: argparse.Namespace):
    """Resolve ``cls`` from a parsed namespace made with :func:`add_arguments` + :func:`add_config_arguments`."""
    ns = vars(args)
    cli = {k: v for k, v in ns.items() if k not in ("config", "env_file", "debug", "verbose", "command", "func")}
    return resolve(cls, cli, ns.get("config"), ns.get("env_file"))


# ---------------------------------------------------------------------------
# output


def to_dict(cfg) -> dict[str, Any]:
    """Plain dict of a config, with any secret-looking key removed."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if not is_secret(k)}


def to_yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def example_yaml(cls, overrides: dict[str, Any] | None = None, title: str = "") -> str:
    """A commented YAML of every option of ``cls``, generated from the dataclass."""
    import yaml

    overrides = overrides or {}
    lines = [f"# {title}"] if title else []
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional"):
            continue
        if f.name in overrides:
            value = overrides[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, sort_keys=False).strip()
        dumped = dumped[1:-1] if dumped.startswith("{") else dumped
        help_text = f.metadata.get("help", "")
        lines.append(f"{dumped}{'  # ' + help_text if help_text else ''}")
    return "\n".join(lines) + "\n"
