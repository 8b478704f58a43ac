"""Data from the ``datasets`` library: a Hugging Face dataset id or a folder of parquet/arrow files.

``--data user/name`` (every split it has), ``--data user/name:test`` (one split, used as
train unless it is named valid/validation/test), ``--data-config NAME`` for a dataset's
configuration; ``--data folder/`` when the folder holds ``*.parquet`` / ``*.arrow`` files
(split by file name: ``train*``, ``valid*``/``validation*``, ``test*``) or a dataset saved
with ``save_to_disk``. Records become the same rows the JSONL loader gives, through the
same format detection and lint, each placed as ``dataset[split]:row`` (1-based) in errors.
The library is an optional extra: ``pip install 'llm-ft[datasets]'``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from common.data import lint_rows
from common.data_formats import LintReport
from common.errors import UserError
from common.rows import Row

FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "val": "valid", "dev": "valid",
               "test": "test"}
HUB_SPEC = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(:[A-Za-z0-9_.\[\]%+-]+)?$"
MAX_ROWS = 5_000_000  # a dataset this large is not a fine-tuning set: refuse before converting it


def is_dataset_dir(path: Path) -> bool:
    """A folder the datasets library reads: save_to_disk output, or parquet/arrow files."""
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    if any((path / f"train{s}").is_file() for s in (".jsonl", ".json")):
        return False  # a JSONL data directory, whatever else lies beside it
    return any(p.suffix in FILE_SUFFIXES for p in path.iterdir() if p.is_file())


def is_hub_dataset(spec: str) -> bool:
    """``user/name`` or ``user/name:split`` that is not a local path."""
    import re

    if Path(spec).exists() or spec.startswith((".", "/", "~")) or not re.match(HUB_SPEC, spec):
        return False
    first = spec.split("/", 1)[0]
    return not Path(first).is_dir()  # runs/x or data/x names a local folder, not a Hub org


def _require():
    if importlib.util.find_spec("datasets") is None:
        raise UserError("reading a Hugging Face dataset or parquet/arrow files needs the datasets library",
                        ["pip install 'llm-ft[datasets]'"])
    import datasets

    return datasets


def _split_of(name: str) -> str | None:
    stem = name.lower().split(".")[0]
    for key, split in SPLIT_NAMES.items():
        if stem == key or stem.startswith((f"{key}-", f"{key}_")):
            return split
    return None


def _open_local(path: Path, config: str | None) -> dict[str, Any]:
    """{split name in the dataset: datasets.Dataset} of a local folder."""
    datasets = _require()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    files: dict[str, list[str]] = {}
    kinds = set()
    for p in sorted(path.iterdir()):
        if p.suffix in FILE_SUFFIXES:
            kinds.add(FILE_SUFFIXES[p.suffix])
            files.setdefault(_split_of(p.name) or "train", []).append(str(p))
    if len(kinds) > 1:
        raise UserError(f"{path}: mixes parquet and arrow files; keep one kind per folder")
    names = {"valid": "validation"}
    return dict(datasets.load_dataset(kinds.pop(), data_files={names.get(k, k): v for k, v in files.items()}))


def _open_hub(spec: str, config: str | None) -> dict[str, Any]:
    datasets = _require()
    repo, _, split = spec.partition(":")
    try:
        got = datasets.load_dataset(repo, name=config, split=split or None)
    except Exception as exc:  # not cached offline, no such dataset, no such split or config
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{spec}: cannot load the Hugging Face dataset: {first}",
                        ["HF_HUB_OFFLINE=1 needs it in the local cache; a private dataset needs HF_TOKEN"]) from None
    if isinstance(got, datasets.DatasetDict):
        return dict(got)
    name = split or "train"
    return {name if _split_of(name) else "train": got}


def records_to_rows(records, label: str, report: LintReport) -> list[Row]:
    """Lint records (dicts) as the JSONL loader lints lines; the first recognised format is the table's."""
    rows = lint_rows(((i, _drop_nulls(obj)) for i, obj in enumerate(records, start=1)), label, report,
                     unit="row", container="split", what="a record")  # columnar storage fills missing keys with null
    if label not in report.formats and not report.errors:
        report.error(label, "no rows")
    return rows


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def load_source(spec: str, path: Path, config: str | None, report: LintReport) -> dict[str, list[Row]]:
    """{train|valid|test: rows} of a dataset source; problems go to ``report``."""
    try:
        tables = _open_local(path, config) if path.is_dir() else _open_hub(spec, config)
    except UserError as exc:
        report.error(spec, exc.render())
        return {}
    out: dict[str, list[Row]] = {}
    base = str(path) if path.is_dir() else spec.partition(":")[0]
    for name, table in tables.items():
        split = _split_of(name) or ("train" if len(tables) == 1 else None)
        if split is None:
            report.warning(f"{base}[{name}]", "split not used (train, validation/valid, test are)")
            continue
        if len(table) > MAX_ROWS:
            report.error(f"{base}[{name}]", f"{len(table):,} rows: more than {MAX_ROWS:,}; sample it with :N")
            continue
        out.setdefault(split, []).extend(records_to_rows(iter(table), f"{base}[{name}]", report))
    return out
