"""Configuration: dataclasses are the single source of truth for defaults and help.

Precedence, lowest first: dataclass defaults < ``.env`` (``LLM_FT_*`` keys) < YAML
(``-c run.yaml``) < command-line flags. Every subcommand declares one dataclass with
:func:`opt` fields; ``common.command.add_arguments`` turns it into argparse flags and
:func:`resolve` merges the layers, collecting every problem before raising.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
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
        factory=None, short: str | None = None, cli: bool = True, min: float | None = None,
        max: float | None = None, gt: float | None = None, lt: float | None = None, finite: bool = True,
        cli_only: bool | Callable[[Any], bool] = False):
    """A config field: its default, help text and valid range live here and only here.

    ``min``/``max`` are inclusive bounds, ``gt``/``lt`` exclusive ones; a float must also be
    finite unless ``finite=False``. ``cli_only`` marks a security switch (one that runs code or
    exposes the machine): a ``.env`` or YAML file may not turn it on, only a flag or the API
    call. ``True`` refuses any value other than the default; a function refuses the values
    for which it returns True.
    """
    meta = {"help": help, "choices": choices, "positional": positional, "short": short, "cli": cli,
            "min": min, "max": max, "gt": gt, "lt": lt, "finite": finite, "cli_only": cli_only}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def range_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is outside field ``f``'s range (its ``opt`` metadata), or None when it is inside."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    m = f.metadata
    if isinstance(value, float) and m.get("finite", True) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    lo, lo_open = (m["gt"], True) if m.get("gt") is not None else (m.get("min"), False)
    hi, hi_open = (m["lt"], True) if m.get("lt") is not None else (m.get("max"), False)
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if not (bad_lo or bad_hi):
        return None
    if lo is not None and hi is not None:
        want = f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        want = f"{'>' if lo_open else '>='} {_fmt(lo)}"
    else:
        want = f"{'<' if hi_open else '<='} {_fmt(hi)}"
    return f"must be {want}, got {value}"


def opts_in(f: dataclasses.Field, value: Any) -> bool:
    """True when ``value`` turns on ``f``'s security switch (see ``opt(cli_only=...)``)."""
    guard = f.metadata.get("cli_only", False)
    if callable(guard):
        return bool(guard(value))
    return bool(guard) and value != default_of(f)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def check(cfg) -> list[str]:
    """Every problem of a built config: each field's range, then the class's cross-field ``validate()``.

    :func:`resolve` checks each layer's values as it reads them (naming the file or flag);
    this is for configs built directly, as the Python API does.
    """
    problems = []
    for f in dataclasses.fields(cfg):
        why = range_problem(f, getattr(cfg, f.name))
        if why:
            problems.append(f"{f.name}: {why}")
    validate = getattr(cfg, "validate", None)
    return problems + (list(validate()) if validate is not None else [])


def is_secret(key: str) -> bool:
    k = key.upper()
    return k.endswith(SECRET_SUFFIXES) or k in {"HF_TOKEN", "WANDB_API_KEY"}


# ---------------------------------------------------------------------------
# types


def unwrap_optional(tp):
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, optional = unwrap_optional(tp)
    if get_origin(base) is Literal:
        name = " | ".join(repr(a) for a in get_args(base))
    elif get_origin(base) is list:
        name = f"list of {_type_name(get_args(base)[0])}"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


def flag(name: str) -> str:
    """The command-line flag of field ``name`` (``lora_r`` -> ``--lora-r``)."""
    return f"--{name.replace('_', '-')}"


def hints(cls) -> dict[str, Any]:
    """Field name -> resolved type of a config class."""
    return typing.get_type_hints(cls)


def group_title(cls, name: str) -> str | None:
    """The ``GROUP`` title of the option class that declares field ``name`` (None: the class has none)."""
    for klass in reversed(cls.__mro__):
        if name in klass.__dict__.get("__annotations__", {}):
            return klass.__dict__.get("GROUP")
    return None


def coerce(value: Any, tp, *, from_text: bool) -> Any:
    """Convert ``value`` to ``tp``; raise ValueError with the expected type's name.

    ``from_text`` is True for .env and CLI strings, where "3" may become 3; YAML values
    keep their own types, except that an int is accepted where a float is expected.
    """
    base, optional = unwrap_optional(tp)
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
# layers


def read_env_file(path: Path, cls) -> dict[str, str]:
    """Read a .env: LLM_FT_* keys become config values; library keys go to os.environ.

    The real environment always wins over the file. Unknown keys are errors naming the
    nearest valid key.
    """
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None
    names = {f.name for f in dataclasses.fields(cls)}
    all_names = _all_config_names()
    out: dict[str, str] = {}
    problems = []
    for key, value in values.items():
        if value is None:
            continue
        if "\x00" in key + value:  # the process environment cannot hold one
            problems.append(f"{path}: {key!r}: contains a NUL character")
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
        elif "TRUST_REMOTE_CODE" in key.upper():  # e.g. HF_DATASETS_TRUST_REMOTE_CODE: a library would run code
            problems.append(f"{path}: {key}: refused from a file: it lets a library run code from a downloaded "
                            "repository, so a cloned folder must not set it; set it in your shell if you mean it")
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
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None
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
    """Build ``cls`` from defaults < .env < YAML < CLI, reporting every problem at once.

    Each value is type-checked and range-checked where it is read, so a problem names its
    source (``FILE: KEY`` or ``--flag``). A file may not turn on a security switch.
    """
    types_ = hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    problems: list[str] = []

    def take(name: str, raw: Any, where: str, *, from_text: bool, from_file: Path | None = None) -> None:
        try:
            value = coerce(raw, types_[name], from_text=from_text)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            return
        why = range_problem(fields[name], value)
        if why:
            problems.append(f"{where}: {why}")
        elif from_file is not None and opts_in(fields[name], value):
            problems.append(f"{where}: {value!r} is refused from a file: this switch runs code or exposes the machine, "
                            f"so a cloned folder must not turn it on; pass {flag(name)} on the command line instead")
        else:
            values[name] = value

    # Only an explicit path or the current directory's .env: never a parent directory's.
    env_path = Path(env_file) if env_file else (cwd or Path.cwd()) / ".env"
    if env_file and not env_path.exists():
        raise UserError(f"{env_path}: .env file not found")
    if env_path.exists():
        for name, raw in read_env_file(env_path, cls).items():
            take(name, raw, f"{env_path}: {ENV_PREFIX}{name.upper()}", from_text=True, from_file=env_path)

    if config_file:
        path = Path(config_file)
        all_names = _all_config_names() | set(fields)
        for name, raw in read_yaml_file(path).items():
            if name not in fields:
                if name not in all_names:
                    hint = nearest(name, sorted(fields))
                    problems.append(f"{path}: unknown key {name!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
                continue
            take(name, raw, f"{path}: {name}", from_text=False, from_file=path)

    for name, raw in (cli or {}).items():
        if name not in fields:
            continue
        take(name, raw, flag(name), from_text=isinstance(raw, str) or
             (isinstance(raw, list) and all(isinstance(v, str) for v in raw)))

    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if not any(p.startswith((flag(name) + ":", f"{name}:")) for p in problems):
                problems.append(f"missing required option {name!r}")
    if problems:
        raise UserError("invalid configuration", problems)
    cfg = cls(**values)
    cross = getattr(cfg, "validate", None)  # checks between fields; ranges were checked above
    if cross is not None:
        found = cross()
        if found:
            raise UserError("invalid configuration", found)
    return cfg


# ---------------------------------------------------------------------------
# output


def to_dict(cfg) -> dict[str, Any]:
    """Plain dict of a config, with any secret-looking key removed."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if not is_secret(k)}


def to_yaml(cfg) -> str:
    import yaml

    values = to_dict(cfg)
    # A switch that is on cannot be read back from a file (see opt(cli_only=...)): leave it out and say so.
    opted_in = [f.name for f in dataclasses.fields(cfg) if f.name in values and opts_in(f, values[f.name])]
    text = yaml.safe_dump({k: v for k, v in values.items() if k not in opted_in}, sort_keys=False, allow_unicode=True)
    return text + "".join(f"# {name}: left out; pass {flag(name)} on the command line (never read from a file)\n"
                          for name in opted_in)


def example_yaml(cls, overrides: dict[str, Any] | None = None, title: str = "") -> str:
    """A commented YAML of every option of ``cls``, generated from the dataclass."""
    import yaml

    overrides = overrides or {}
    lines = [f"# {title}"] if title else []
    section = None
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional"):
            continue
        group = group_title(cls, f.name)
        if group != section and group:
            lines.append(f"\n# --- {group}")
        section = group
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
