"""Checkpoints: written whole or not at all, verified by checksums, rotated safely.

A checkpoint is ``checkpoints/step-N/``::

    adapter/                 the adapter at step N (PEFT format)
    optimizer.*, rng.*       the backend's state (Backend.save_state)
    trainer_state.json       step, data position, best eval, python/numpy RNG
    run.json                 what the run must match to resume (rank, targets, base, tokenizer, data)
    manifest.json            sha256 and size of every file above; written last

It is built under a temporary name and renamed into place (common.io.atomic_dir), so a
crash leaves either the old set of checkpoints or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.io import atomic_dir

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
RUN_INFO = "run.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def write(run_dir: Path, step: int, write_files: Callable[[Path], list[str]], trainer_state: dict[str, Any],
          run_info: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically; ``write_files(tmp)`` writes the backend's files.

    ``write_files`` returns the names of optional state files (optimizer state), which a
    resume may do without when the user allows it; every other file must be present.
    """
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        state_files = write_files(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n", encoding="utf-8")
        (tmp / RUN_INFO).write_text(json.dumps(run_info, indent=1) + "\n", encoding="utf-8")
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                files[rel] = {"sha256": sha256(p), "bytes": p.stat().st_size}
        manifest = {"step": step, "files": files, "state_files": sorted(state_files)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return final


def verify(ckpt: Path) -> list[str]:
    """Problems that make ``ckpt`` unusable (empty when it is sound).

    Optimizer-state files listed as ``state_files`` may be missing without making the
    checkpoint unusable (the resume decides); a present file must match its checksum.
    """
    ckpt = Path(ckpt)
    mfile = ckpt / MANIFEST
    if not mfile.exists():
        return [f"{mfile}: missing (checkpoint incomplete)"]
    try:
        manifest = json.loads(mfile.read_text(encoding="utf-8"))
        files = manifest["files"]
        optional = set(manifest.get("state_files", []))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{mfile}: unreadable ({exc})"]
    problems = []
    for rel, info in files.items():
        p = ckpt / rel
        if not p.exists():
            if rel not in optional:
                problems.append(f"{p}: missing")
            continue
        if p.stat().st_size != info["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)")
        elif sha256(p) != info["sha256"]:
            problems.append(f"{p}: checksum mismatch")
    return problems


def steps(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints in ``run_dir`` as (step, path), newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def newest_verified(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint whose manifest verifies; each one skipped is warned about by name."""
    for _, path in steps(run_dir):
        problems = verify(path)
        if not problems:
            return path
        warn(f"skipping checkpoint {path}: " + "; ".join(problems))
    return None


def remove_stale(run_dir: Path) -> None:
    """Delete temporary directories a killed run left behind (``.step-N.*.tmp``, ``.adapter.*``)."""
    for parent in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")
                                               or p.name.endswith(".deleting")):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def rotate(run_dir: Path, keep: int, newest_good: Path,
           is_good: Callable[[Path], bool] = lambda p: not verify(p)) -> list[Path]:
    """Keep the ``keep`` newest checkpoints that verify (``newest_good`` always among them); delete the
    ones older than those.

    Counting only verified checkpoints means a corrupt newer one never pushes a good older one
    out. A corrupt one newer than the oldest kept is left for inspection (a resume skips it with a
    warning). A directory is renamed before it is deleted, so a kill mid-delete leaves no
    half-deleted ``step-N`` that could look like a checkpoint.
    """
    removed, good = [], 0
    newest_good = Path(newest_good).resolve()
    for _, path in steps(run_dir):
        if good < max(keep, 1) or path.resolve() == newest_good:
            good += path.resolve() == newest_good or is_good(path)
            continue
        doomed = path.with_name(f".{path.name}.deleting")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


def finished(run_dir: Path, ckpt: Path, total_steps: int) -> str | None:
    """Why a ``--resume`` from ``ckpt`` has nothing to do, or None: summary.json says the run finished
    at that checkpoint and this one plans no step beyond it (``total_steps``: its planned steps)."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
        step = read(ckpt)[0]["step"]
        reason, done, planned = summary.get("stop_reason"), summary["steps"], summary["total_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if done != step or not (reason == "completed" and total_steps <= step
                            or reason == "early_stop" and total_steps == planned):
        return None
    return (f"{run_dir}: already finished ({reason.replace('_', ' ')} at step {step}); nothing to resume, "
            "nothing rewritten (raise --max-steps or --epochs to train further)")


def read(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, run_info) of a verified checkpoint."""
    ckpt = Path(ckpt)
    return (json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8")),
            json.loads((ckpt / RUN_INFO).read_text(encoding="utf-8")))


def mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Every key whose value differs between a checkpoint's run info and this run's."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint has {_short(saved.get(key))}, this run has {_short(current.get(key))}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def check_compatible(ckpt: Path, current: dict[str, Any]) -> None:
    """Refuse to resume ``ckpt`` into a run that differs in what the adapter or data order depend on."""
    _, saved = read(ckpt)
    found = mismatches(saved, current)
    if found:
        raise UserError(f"cannot resume from {ckpt}: the run differs from the checkpoint's "
                        "(start a new --out, or restore the original settings)", found)
