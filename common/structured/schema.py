"""The answer schema behind ``--format``: where it is, its classifier field, and its fallback value.

``--format schema`` means "the schema of this data or run" (``schema.json`` beside the data,
the run's ``json_schema``, or ``export/schema.json`` beside an exported GGUF), the way Ollama's
``format`` takes a JSON schema; ``--format FILE.json`` names one. The classifier field is the
schema's first top-level string property whose values are listed: an ``enum``, or a ``const`` in
each ``anyOf`` branch (``intent`` in data/schema.json, one branch per intent with its slots):
its values are what confidence is computed over, and its fallback (the property's
``default``, else a value named ``unknown``/``other``/``none``) is what a low confidence turns into.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError

FALLBACK_NAMES = ("unknown", "other", "none", "fallback")  # enum values that mean "none of the above"


@dataclass(frozen=True)
class EnumField:
    """A top-level string property whose value is one of ``values`` (a classifier's label)."""

    key: str
    values: tuple[str, ...]
    fallback: str | None = None


@dataclass
class AnswerFormat:
    """A JSON schema answers must satisfy, read from ``path``."""

    path: Path
    schema: dict[str, Any]
    enum: EnumField | None = None
    notes: list[str] = field(default_factory=list)  # what the constraint cannot enforce (said once)

    @property
    def text(self) -> str:
        return json.dumps(self.schema, ensure_ascii=False)


def branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The object schemas an answer may take: the ``anyOf``/``oneOf`` branches (each merged with the top
    level's ``properties`` and ``required``), or the schema itself when it has none."""
    if not isinstance(schema, dict):
        return []
    alts = schema.get("anyOf") or schema.get("oneOf")
    if not isinstance(alts, list) or not all(isinstance(b, dict) for b in alts):
        return [schema]
    top_props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    top_req = list(schema.get("required") or [])
    out = []
    for b in alts:
        props = b.get("properties") if isinstance(b.get("properties"), dict) else {}
        out.append({"properties": {**top_props, **props},
                    "required": top_req + [k for k in b.get("required") or [] if k not in top_req]})
    return out


def top_keys(schema: dict[str, Any]) -> list[str]:
    """The top-level keys every answer must have (required in every branch), else every property named."""
    shapes = branches(schema)
    if not shapes:
        return []
    required = [k for k in shapes[0].get("required") or [] if isinstance(k, str)
                and all(k in (s.get("required") or []) for s in shapes)]
    return required or list(dict.fromkeys(k for s in shapes for k in s.get("properties") or {}))


def _string_values(spec: Any) -> list[str] | None:
    """The values a property allows when it lists them: ``enum`` or ``const`` of strings."""
    if not isinstance(spec, dict):
        return None
    values = spec.get("enum") if "enum" in spec else [spec["const"]] if "const" in spec else None
    return values if isinstance(values, list) and values and all(isinstance(v, str) for v in values) else None


def field_values(schema: dict[str, Any], key: str) -> list[str] | None:
    """The strings top-level ``key`` may hold, in the schema's order, when every branch lists them; else None."""
    per = [_string_values((s.get("properties") or {}).get(key)) for s in branches(schema)]
    if not per or any(v is None for v in per):
        return None
    return list(dict.fromkeys(v for vs in per for v in vs))


def enum_field(schema: dict[str, Any]) -> EnumField | None:
    """The classifier field: the first top-level property (required ones first) whose allowed values are
    listed strings, either one ``enum`` (``{"intent": {"enum": [...]}}``) or, in a schema of ``anyOf``/
    ``oneOf`` branches, a ``const`` or ``enum`` in every branch (``{"intent": {"const": "set_timer"}, "slots":
    {...}}``: one branch per value, the slots that go with it). Its values, in the schema's order, are
    what confidence is computed over."""
    shapes = branches(schema)
    keys = top_keys(schema) + [k for s in shapes for k in s.get("properties") or {}]
    for key in dict.fromkeys(keys):
        values = field_values(schema, key)
        if values is None or len(values) < 2:
            continue
        specs = [(s.get("properties") or {}).get(key) for s in shapes]
        default = next((spec.get("default") for spec in specs if "default" in spec), None)
        fallback = default if default in values else next(
            (v for v in values if v.lower() in FALLBACK_NAMES), None)
        return EnumField(key, tuple(values), fallback)
    return None


def violations(value: Any, schema: dict[str, Any], validator=None) -> list[tuple[str, str]]:
    """Why ``value`` does not satisfy ``schema``, as (path, message) pairs (empty when it does).

    A schema of one ``anyOf``/``oneOf`` branch per class value (data/schema.json) fails as a whole
    ("not valid under any of the given schemas"); say instead which class value is not allowed, or
    what the branch of the answer's class value wants. ``validator``: a prepared one for ``schema``.
    """
    if validator is None:
        from jsonschema.validators import validator_for

        validator = validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        return []
    alts = schema.get("anyOf") or schema.get("oneOf")
    enum = enum_field(schema) if isinstance(alts, list) and len(alts) > 1 else None
    if enum is not None and isinstance(value, dict) and any(not e.absolute_path and e.validator in ("anyOf", "oneOf")
                                                            for e in errors):
        label = value.get(enum.key)
        if enum.key not in value:
            return [("", f"{enum.key!r} is a required property")]
        if label not in enum.values:
            return [(enum.key, f"{label!r} is not one of {list(enum.values)}")]
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
        for alt in alts:
            if label in (_string_values((alt.get("properties") or {}).get(enum.key)) or []):
                sub = {**rest, "allOf": [*rest.get("allOf", []), alt]}
                return violations(value, sub, type(validator)(sub, format_checker=validator.format_checker))
    return [("/".join(map(str, e.absolute_path)), e.message) for e in errors]


def load_format(path: str | Path) -> AnswerFormat:
    """Read and check a schema file; UserError naming the file (and line) when it is not a JSON schema."""
    from common.data import load_schema

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: JSON schema file not found (--format takes 'schema' or a .json file)")
    validator = load_schema(p)  # JSON syntax with line numbers, and the metaschema check
    schema = validator.schema
    if not isinstance(schema, dict):
        raise UserError(f"{p}: a --format schema must be a JSON object, got {type(schema).__name__}")
    return AnswerFormat(p, schema, enum_field(schema))


def resolve_format(spec: str | None, *, data_schema: Path | None = None, target=None) -> AnswerFormat | None:
    """The schema ``--format`` names: None when not given; ``schema`` = the data's or the target's schema."""
    if spec is None or spec == "":
        return None
    if spec != "schema":
        return load_format(spec)
    for candidate in (data_schema, target_schema(target) if target is not None else None):
        if candidate is not None and Path(candidate).is_file():
            return load_format(candidate)
    raise UserError("--format schema: no schema found (looked for schema.json beside the data, the run's "
                    "json_schema, and export/schema.json beside a GGUF); pass --format FILE.json")


def target_schema(target) -> Path | None:
    """The schema a target was trained for: its run's (see :func:`run_schema`), else schema.json beside a
    GGUF (``llm-ft export`` writes it there)."""
    if target.run_dir is not None and (found := run_schema(target.run_dir)) is not None:
        return found
    if target.gguf_file is not None and (Path(target.gguf_file).parent / "schema.json").is_file():
        return Path(target.gguf_file).parent / "schema.json"
    return None


def run_schema(run_dir: str | Path) -> Path | None:
    """A run's schema: its config's json_schema, else schema.json beside its data (paths as train saw them,
    relative to the working directory or to the folder holding ``runs/``)."""
    from common.data import parse_source
    from common.run_dir import RunDir

    run_dir = Path(run_dir).resolve()
    config = RunDir(run_dir).config()
    roots = [Path.cwd(), run_dir.parent.parent]
    if config.get("json_schema"):
        for root in roots:
            p = Path(config["json_schema"])
            p = p if p.is_absolute() else root / p
            if p.is_file():
                return p
    for spec in config.get("data") or []:
        path, _ = parse_source(str(spec))
        for root in roots:
            p = path if path.is_absolute() else root / path
            candidate = (p if p.is_dir() else p.parent) / "schema.json"
            if candidate.is_file():
                return candidate
    return None


def with_fallback(value: Any, fmt: AnswerFormat) -> Any:
    """``value`` with its enum field set to the fallback, other fields emptied where the schema needs it.

    Used when confidence is below ``--threshold``: the answer keeps its shape (a schema like
    data/schema.json requires ``slots`` to be empty for ``unknown``), so the JSON stays valid.
    """
    from common.evaluate.metrics import schema_errors

    assert fmt.enum is not None and fmt.enum.fallback is not None
    out = copy.deepcopy(value) if isinstance(value, dict) else {}
    out[fmt.enum.key] = fmt.enum.fallback
    if not schema_errors(out, fmt.schema):
        return out
    empty = {dict: {}, list: [], str: ""}
    for key, v in list(out.items()):
        if key != fmt.enum.key and type(v) in empty:
            out[key] = empty[type(v)]
    return out


def mentions_schema(system_prompt: str | None, schema: dict[str, Any]) -> bool:
    """Whether a system prompt names every required top-level key (Ollama advises putting the schema in
    the prompt as well as in ``format``: the model then writes the fields it was asked for)."""
    if not system_prompt:
        return False
    keys = top_keys(schema)
    return bool(keys) and all(k in system_prompt for k in keys)


# Used by serve's page: the schema file itself and a verdict on an answer.
def load_schema(path: str | Path) -> dict:
    """Read a JSON schema file, naming the file and line of a syntax error."""
    p = Path(path)
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: JSON schema file not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise UserError(f"{p}: not a valid JSON schema: {exc.message}") from None
    return schema


def json_verdict(answer: str, schema: dict | None) -> tuple[str | None, str | None]:
    """``(pretty JSON, verdict)`` for an answer; ``(None, None)`` when it is no JSON task and no JSON."""
    from common.evaluate.metrics import parse_json, schema_errors

    ok, value = parse_json(answer)
    if not ok:
        return (None, None) if schema is None else (None, "**invalid**: the answer is not valid JSON")
    pretty = json.dumps(value, indent=2, ensure_ascii=False)
    if schema is None:
        return pretty, "**valid JSON** (no schema to check it against)"
    errors = schema_errors(value, schema)
    if not errors:
        return pretty, "**valid**: matches the schema"
    shown = "\n".join(f"- `{e}`" for e in errors[:10])
    return pretty, f"**invalid** against the schema:\n{shown}"
