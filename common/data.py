"""Data: read files into rows, lint every row, build train/valid/test splits.

Sources are data directories (``train.jsonl`` + optional ``valid.jsonl``/``test.jsonl``,
or ``.json`` variants), single files (``.jsonl``, ``.json`` arrays or JSON lines, ``.txt``/
``.md`` domain text), each optionally ``PATH:N`` to sample N rows. Bad rows never raise
here: every problem goes into the :class:`LintReport`, so one pass lists them all; the
caller decides with ``splits.report.raise_if_errors()``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.data_formats import (  # noqa: F401
    LintReport,
    Problem,
    canonical,
    convert_row,
    detect_format,
    json_type,
    row_key,
    text_chunks,
    unknown_format,
)
from common.errors import UserError
from common.row_bounds import MAX_DEPTH, MAX_LINE_BYTES, parse_row, too_deep
from common.rows import Conversation, Row, Source, Text

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md")
SPLIT_FILES = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}
SAMPLE_RE = re.compile(r"^(?P<path>.+):(?P<n>\d+)$")


@dataclass
class Splits:
    """The loaded data: rows per split, every problem found, and the files read."""

    train: list[Row] = field(default_factory=list)
    valid: list[Row] = field(default_factory=list)
    test: list[Row] = field(default_factory=list)
    report: LintReport = field(default_factory=LintReport)
    files: list[Path] = field(default_factory=list)
    schema_path: Path | None = None
    valid_from_train: bool = False  # True when valid was held out of train (valid_fraction)

    def items(self) -> list[tuple[str, list[Row]]]:
        return [("train", self.train), ("valid", self.valid), ("test", self.test)]


# ---------------------------------------------------------------------------
# files


def parse_source(spec: str) -> tuple[Path, int | None]:
    """``PATH`` or ``PATH:N``. Only a trailing ``:digits`` is a count (``C:\\data`` stays a path)."""
    m = SAMPLE_RE.match(spec)
    if m and not Path(spec).exists():
        return Path(m["path"]), int(m["n"])
    return Path(spec), None


def _unclosed(text: str) -> bool:
    """True when JSON text ends inside a string or an open object/array (a cut-off line)."""
    depth, in_string, escape = 0, False, False
    for ch in text:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return in_string or depth > 0


def _json_lines(path: Path, data: bytes, report: LintReport) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line; BOM and CRLF accepted silently.

    A line over MAX_LINE_BYTES is refused before it is decoded or parsed."""
    lines = data.split(b"\n")  # not splitlines(): U+2028 may sit raw inside a JSON string
    last = max((i for i, raw in enumerate(lines, 1) if raw.strip()), default=0)
    for i, raw in enumerate(lines, 1):
        raw = raw.rstrip(b"\r")
        if len(raw) > MAX_LINE_BYTES:
            report.error(f"{path}:{i}", f"line is {len(raw) / 2**20:.1f} MiB, over the "
                                        f"{MAX_LINE_BYTES >> 20} MiB limit for one row")
            continue
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.error(f"{path}:{i}:{exc.start + 1}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x})")
            continue
        try:
            ok, value = parse_row(text, f"{path}:{i}", report)
        except json.JSONDecodeError as exc:
            truncated = i == last and _unclosed(text)
            hint = " (the last line ends early: truncated file?)" if truncated else ""
            report.error(f"{path}:{i}:{exc.colno}", f"invalid JSON{hint}: {exc.msg}")
            continue
        if ok:
            yield i, value


def _json_array(path: Path, text: str, report: LintReport) -> Iterator[tuple[int, Any]]:
    """(line number, element) per element of a top-level JSON array, parsed one at a time."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"\s*")
    while True:
        pos = ws.match(text, pos).end()
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, end = decoder.raw_decode(text, pos)
            deep = too_deep(obj)
        except json.JSONDecodeError as exc:
            report.error(f"{path}:{exc.lineno}:{exc.colno}", f"invalid JSON: {exc.msg}")
            return
        except RecursionError:  # deeper than the interpreter's limit: certainly over ours
            deep = True
        if deep:
            report.error(f"{path}:{line}", f"JSON nested more than {MAX_DEPTH} levels deep (the limit for one row)")
            return
        yield line, obj
        pos = ws.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            line, col = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
            report.error(f"{path}:{line}:{col}", "invalid JSON: expected ',' or ']' after an array element"
                         if pos < len(text) else "invalid JSON: the array is not closed (truncated file?)")
            return


def load_file(path: str | Path, *, tokenizer=None, max_seq_length: int = 1024) -> tuple[list[Row], LintReport]:
    """Read one data file; every row is checked. Returns the good rows and the report.

    The file's format is that of its first recognised row; a row in another format is an
    error naming its line. ``.txt``/``.md`` files become :class:`Text` chunks of at most
    ``max_seq_length`` tokens (counted with ``tokenizer`` when given).
    """
    path = Path(path)
    report = LintReport()
    if not path.is_file():
        report.error(str(path), "file not found" if not path.exists() else "not a file")
        return [], report
    suffix = path.suffix.lower()
    if suffix not in (*JSON_SUFFIXES, *TEXT_SUFFIXES):
        report.error(str(path), f"unsupported file type {suffix or '(none)'!r}: use .jsonl, .json, .txt or .md")
        return [], report
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")

    if suffix in TEXT_SUFFIXES:
        try:
            text = data.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            report.error(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x})")
            return [], report
        rows: list[Row] = [Text(chunk, Source(str(path), line))
                           for line, chunk in text_chunks(text, max_seq_length, tokenizer)]
        if not rows:
            report.error(str(path), "no text")
        report.formats[str(path)] = "text"
        return rows, report

    stripped = data.lstrip()
    if suffix == ".json" and stripped.startswith(b"["):
        try:
            items = list(_json_array(path, data.decode("utf-8"), report))
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            report.error(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x})")
            return [], report
    else:  # JSON lines (also .json files written as JSON lines, as the datasets library does)
        items = list(_json_lines(path, data, report))

    rows = lint_rows(items, str(path), report)
    if not items and report.ok:
        report.error(str(path), "no rows")
    return rows, report


# ---------------------------------------------------------------------------
# splits


def _split_files(directory: Path) -> dict[str, Path]:
    found = {}
    for split, stems in SPLIT_FILES.items():
        for stem in stems:
            hit = next((directory / f"{stem}{s}" for s in JSON_SUFFIXES if (directory / f"{stem}{s}").is_file()), None)
            if hit is not None:
                found[split] = hit
                break
    return found


def hold_out(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split ``fraction`` of ``rows`` off for validation, deterministically by ``seed``; order is kept."""
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    n_valid = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_valid])
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


def _sample(rows: list[Row], n: int, seed: int, name: str, where: str, report: LintReport) -> list[Row]:
    if n >= len(rows):
        if n > len(rows):
            report.warning(where, f"asked for {n} rows, the source has {len(rows)}; using all of them")
        return rows
    keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(rows)), n))  # str seeds are stable across runs
    return [rows[i] for i in keep]


def find_schema(paths: list[str], explicit: str | None = None) -> Path | None:
    """The JSON schema for answers: ``explicit`` (--json-schema), else ``schema.json`` beside the data."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError(f"{p}: JSON schema not found")
        return p
    for spec in paths:
        path, _ = parse_source(spec)
        candidate = (path if path.is_dir() else path.parent) / "schema.json"
        if candidate.is_file():
            return candidate
    return None


def load_schema(path: Path):
    """A jsonschema validator for ``path``; UserError naming the file if it is not a valid schema."""
    import jsonschema

    try:
        schema = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UserError(f"{path}: not a valid JSON schema: {exc.message}") from None
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_answers(rows: list[Row], validator, schema_name: str, report: LintReport) -> None:
    """Every final assistant answer must be JSON that satisfies the schema."""
    from common.structured.schema import violations

    for row in rows:
        if not isinstance(row, Conversation) or row.messages[-1]["role"] != "assistant":
            continue
        try:
            answer = json.loads(row.messages[-1]["content"])
        except json.JSONDecodeError as exc:
            report.error(str(row.source), f"answer is not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        problems = violations(answer, validator.schema, validator)
        if problems:
            at, message = problems[0]
            report.error(str(row.source), f"answer does not match {schema_name}: {message}" +
                         (f" (at {at})" if at else ""))


def check_leakage(splits: Splits) -> None:
    """Warn about valid/test rows whose prompt and answer also appear in train."""
    seen: dict[str, Row] = {}
    for row in splits.train:
        seen.setdefault(row_key(row), row)
    for name, rows in splits.items()[1:]:
        for row in rows:
            twin = seen.get(row_key(row))
            if twin is not None:
                splits.report.count(f"leaked_{name}")
                splits.report.warning(str(row.source), f"same prompt and answer as train row {twin.source} "
                                                       f"(leakage into {name})")


def _from_datasets(spec: str, path: Path, n: int | None, seed: int, config: str | None, splits: Splits) -> bool:
    """Load a Hub dataset id or a parquet/arrow folder into ``splits`` (common.hub_data); False if not one."""
    from common import hub_data

    if not (hub_data.is_dataset_dir(path) or (not path.exists() and hub_data.is_hub_dataset(str(path)))):
        return False
    for split, rows in hub_data.load_source(str(path), path, config, splits.report).items():
        if split == "train" and n is not None:
            rows = _sample(rows, n, seed, path.name, spec, splits.report)
        getattr(splits, split).extend(rows)
    splits.files.append(path)
    return True


def load_splits(paths: list[str], *, valid_fraction: float, seed: int, schema: str | None = None,
                tokenizer=None, max_seq_length: int = 1024, data_config: str | None = None) -> Splits:
    """Load every source into train/valid/test, lint every row, check leakage and the schema.

    Never raises for bad data: call ``splits.report.raise_if_errors()`` before training.
    Without any validation file, ``valid_fraction`` of train is held out (seeded).
    ``tokenizer``/``max_seq_length`` size the chunks of ``.txt``/``.md`` sources.
    """
    splits = Splits()
    report = splits.report
    has_valid_file = False
    for spec in paths:
        path, n = parse_source(spec)
        if n is not None and n < 1:
            report.error(spec, "a sample count must be at least 1")
            continue
        if _from_datasets(spec, path, n, seed, data_config, splits):
            has_valid_file |= bool(splits.valid)
            continue
        if path.is_dir():
            found = _split_files(path)
            if "train" not in found:
                texts = sorted(p for p in path.iterdir() if p.suffix.lower() in TEXT_SUFFIXES)
                if not texts:
                    report.error(str(path), "no train.jsonl (or train.json) in this directory")
                    continue
                found = {"train": texts}
        elif path.exists():
            found = {"train": path}
        else:
            report.error(str(path), "data not found")
            continue
        for split, files in found.items():
            rows = []
            for f in files if isinstance(files, list) else [files]:
                got, file_report = load_file(f, tokenizer=tokenizer, max_seq_length=max_seq_length)
                report.extend(file_report)
                splits.files.append(f)
                rows += got
            if split == "train" and n is not None:
                rows = _sample(rows, n, seed, path.name, spec, report)
            has_valid_file |= split == "valid"
            getattr(splits, split).extend(rows)
    if not has_valid_file:
        splits.train, splits.valid = hold_out(splits.train, valid_fraction, seed)
        splits.valid_from_train = bool(splits.valid)
    if not splits.train and not report.errors:
        report.error("", "no training rows")
    check_leakage(splits)
    try:
        splits.schema_path = find_schema(paths, schema)
        if splits.schema_path is not None:
            validator = load_schema(splits.schema_path)
            for _, rows in splits.items():
                check_answers(rows, validator, splits.schema_path.name, report)
    except UserError as exc:
        report.error("", exc.message)
    return splits


# ---------------------------------------------------------------------------
# fingerprint and token statistics


def fingerprint(splits: Splits) -> dict[str, Any]:
    """Counts per split and sha256 over canonical row content (no paths): stable across runs and machines."""
    out: dict[str, Any] = {}
    total = hashlib.sha256()
    for name, rows in splits.items():
        h = hashlib.sha256()
        for row in rows:
            h.update(json.dumps(canonical(row), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
            h.update(b"\n")
        out[name] = {"rows": len(rows), "sha256": h.hexdigest()}
        total.update(f"{name}:{h.hexdigest()}\n".encode())
    out["sha256"] = total.hexdigest()
    out["valid_from_train"] = splits.valid_from_train
    out["files"] = [str(f) for f in splits.files]
    return out


def lint_rows(items, label: str, report: LintReport, *, unit: str = "line", container: str = "file",
              what: str = "a JSON object") -> list[Row]:
    """Rows from ``(position, object)`` pairs of one file or dataset split ``label``: each object's format
    detected and checked, every problem reported as ``label:position``; one format per file or split."""
    rows: list[Row] = []
    first: tuple[str, int] | None = None  # (format, position)
    mixed: list[tuple[int, str]] = []
    for pos, obj in items:
        where = f"{label}:{pos}"
        if not isinstance(obj, dict):
            report.error(where, f"expected {what} (one row), got {json_type(obj)}")
            continue
        fmt = detect_format(obj)
        if fmt is None:
            unknown_format(obj, where, report)
            continue
        if first is None:
            first = (fmt, pos)
        elif fmt != first[0]:
            mixed.append((pos, fmt))
            continue
        row = convert_row(obj, fmt, Source(label, pos), where, report)
        if row is not None:
            rows.append(row)
    if mixed:
        pos, fmt = mixed[0]
        more = f" ({len(mixed)} rows in other formats)" if len(mixed) > 1 else ""
        report.error(f"{label}:{pos}", f"row in {fmt!r} format, but this {container}'s rows are {first[0]!r} "
                                       f"(from {unit} {first[1]}); use one format per {container}{more}")
    if first is not None:
        report.formats[label] = first[0]
    return rows
