"""``llm-ft merge RUN``: the adapter merged into the original base weights, as an HF directory.

The output is a plain Hugging Face model directory (safetensors shards, config.json,
generation_config.json, tokenizer files and chat template) that transformers, mlx-lm,
vLLM or llama.cpp's own converter can load. Written under a temporary name beside ``--out``
and renamed into place, so a failed merge never leaves a half-written directory behind.
An existing ``--out`` is replaced only when it holds nothing but a previous merge's files and
is the default ``RUN/merged`` or ``--force`` says so; the run, the base model, and any folder
holding them are never replaced.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.config import opt, register
from common.errors import UserError
from common.export.merge import MergedModel, open_merged
from common.export.st_io import DTYPES, ShardedWriter
from common.io import atomic_dir, free_bytes

# Files copied beside the weights (tokenizer, chat template, generation defaults).
AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@register
@dataclass
class MergeConfig:
    run: str = opt(help="run directory (written by 'llm-ft train')", positional=True)
    out: str | None = opt(None, "output directory (default: RUN/merged)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the merged weights; auto keeps each base tensor's dtype")
    shard_size_gb: float = opt(2.0, "largest safetensors shard, in GB", gt=0)
    force: bool = opt(False, "replace an existing --out that holds a previous merge (never a folder with other files)")


def _storage_dtype(base_dtype: str, wanted: str) -> str:
    if wanted == "auto" or base_dtype not in ("F32", "F16", "BF16", "F64"):
        return base_dtype
    return DTYPE_NAMES[wanted]


def estimate_bytes(merged: MergedModel, dtype: str = "auto") -> int:
    """Size of the merged weights on disk, in bytes."""
    total = 0
    for name in merged.names:
        info = merged.info(name)
        n = 1
        for s in info.shape:
            n *= s
        total += n * DTYPES[_storage_dtype(info.dtype, dtype)].itemsize
    return total


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse early, before writing anything, when the disk cannot hold ``needed`` bytes (+5%)."""
    free = free_bytes(directory)
    if free < needed * 1.05 + 16 * 2**20:
        raise UserError(f"{directory}: not enough free disk space for {what}: need ~{needed / 2**30:.2f} GiB, "
                        f"{free / 2**30:.2f} GiB free")


def copy_aux_files(base_dir: Path, out: Path, config_updates: dict | None = None,
                   chat_template: str | None = None) -> None:
    """config.json (with updates), tokenizer files and the chat template, beside the weights."""
    cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    cfg.update(config_updates or {})
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in AUX_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    if chat_template is not None:  # the template training used overrides the tokenizer's own
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        (out / "chat_template.json").unlink(missing_ok=True)
        tc = out / "tokenizer_config.json"
        if tc.exists():
            data = json.loads(tc.read_text(encoding="utf-8"))
            if data.pop("chat_template", None) is not None:
                tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_merged(merged: MergedModel, out: str | Path, *, dtype: str = "auto", shard_bytes: int = 2 * 2**30,
                 chat_template: str | None = None, progress: bool = True) -> Path:
    """Write ``merged`` as an HF directory at ``out`` (atomically; streamed tensor by tensor)."""

    out = Path(out)
    check_free_space(out.parent if not out.exists() else out, estimate_bytes(merged, dtype), f"the merged model {out}")
    plan = [(n, _storage_dtype(merged.info(n).dtype, dtype), merged.info(n).shape) for n in merged.names]
    try:
        _write(merged, out, plan, dtype, shard_bytes, chat_template, progress)
    except OSError as exc:
        if isinstance(exc, UserError):  # already one line naming the file (common.io.WriteError)
            raise
        from common.export.gguf_file import write_error

        raise write_error(out, exc) from None
    return out


def _write(merged: MergedModel, out: Path, plan, dtype: str, shard_bytes: int, chat_template: str | None,
           progress: bool) -> None:
    from rich.progress import track

    with atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes=shard_bytes)
        for name, dtype_out, _ in track(plan, description="merging", disable=not progress, transient=True):
            if merged.is_changed(name) or merged.info(name).dtype != dtype_out:
                writer.write(name, merged.float32(name))
            else:  # untouched tensors are copied bit for bit (no fp32 round trip)
                writer.write(name, merged.base.raw(name))
        writer.close()
        updates = dict(merged.config_updates)
        if dtype != "auto":
            updates["dtype"] = dtype
        copy_aux_files(merged.base_dir, tmp, updates, chat_template)


def run_chat_template(run) -> str | None:
    """The chat template a run was trained with when it overrode the tokenizer's."""
    override = run.chat_template_override()
    if not override:
        return None
    from common.prompts import NAMED_TEMPLATES

    if override in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[override]
    path = Path(override)
    if not path.is_file():
        raise UserError(f"{run.path / 'config.json'}: chat_template {override!r}: file not found")
    return path.read_text(encoding="utf-8")


def _is_merge_file(name: str) -> bool:
    return (name in AUX_FILES or name in ("config.json", "model.safetensors.index.json")
            or (name.startswith("model") and name.endswith(".safetensors")))


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or a folder inside it."""
    return a == b or b in a.parents


def check_out(out: Path, protected: dict[str, Path], *, replaceable: bool) -> None:
    """Refuse an ``--out`` whose replacement would destroy what the user did not hand over.

    ``protected`` names folders (the run, the base model) that ``out`` may neither be nor contain
    (a base folder looks just like a merge's output); ``replaceable`` is whether an existing
    previous merge there may go.
    """
    target = out.resolve()
    for what, path in protected.items():
        path = path.resolve()
        if _within(path, target):
            raise UserError(f"--out {out}: {'is' if target == path else 'overlaps'} the {what} ({path}); "
                            "merge never writes into or over it: choose a new folder")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise UserError(f"--out {out}: exists and is not a folder; choose a new path")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [n for n in entries if not _is_merge_file(n)]
    if foreign:
        raise UserError(f"--out {out}: holds files a merge did not write ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it: choose a new folder")
    if not replaceable:
        raise UserError(f"--out {out}: exists and holds a model; choose a new folder, "
                        "or pass --force to replace it with this merge")


def run(cfg: MergeConfig) -> Path:
    """Merge the run's adapter into its original base model; returns the output directory."""
    from common.run_dir import RunDir, RunLock

    rd = RunDir.open(cfg.run)
    base = Path(rd.base_model())
    merged = open_merged(base, rd.adapter_dir)
    out = Path(cfg.out) if cfg.out else rd.path / "merged"
    check_out(out, {"run directory": rd.path, "base model": base}, replaceable=cfg.force or not cfg.out)
    # Into the run (the default): one writer at a time there, as for train and export.
    with RunLock(rd.path, "llm-ft merge") if _within(out.resolve(), rd.path.resolve()) else _nothing():
        write_merged(merged, out, dtype=cfg.dtype, shard_bytes=int(cfg.shard_size_gb * 1e9),
                     chat_template=run_chat_template(rd))
    n = sum(1 for name in merged.names if merged.is_changed(name))
    print(f"merged {n} adapted tensors into {merged.base_dir} -> {out}")
    print(f"next: llm-ft eval {out}   or: llm-ft export {out}", file=sys.stderr)
    return out


def _nothing():
    return contextlib.nullcontext()


def build_parser():
    from common.command import make_parser

    return make_parser("merge", "Merge a run's LoRA/DoRA adapter into the original full-precision base "
                       "weights and write a Hugging Face model directory.", MergeConfig)


def main(argv=None) -> int:
    from common.command import main_for

    return main_for(build_parser, MergeConfig, lambda cfg: (run(cfg), 0)[1], argv)
