"""A run directory describes itself; eval, merge, export, chat and serve need only it.

Layout (written by ``llm-ft train``)::

    runs/<name>/
      config.json            resolved TrainConfig + {"backend": ..., "base_model": {...}}
      adapter/               best adapter, PEFT format (adapter_model.safetensors + adapter_config.json)
      checkpoints/step-N/    adapter + optimizer/RNG/loop state + manifest.json (checksums)
      system_prompt.txt      the exact system prompt used in training (absent if none)
      data_fingerprint.json  counts and hashes of the training data
      metrics.jsonl          one JSON object per logged event
      loss.png, summary.json
      eval/                  metrics.json, errors.jsonl, confusion.png
      export/                model.gguf, Modelfile, verify.json
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.peft import WEIGHTS


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists() and (p / "adapter").is_dir()


@dataclass
class RunDir:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"{p}: run directory not found")
        if not (p / "config.json").exists():
            raise UserError(f"{p}: not a run directory (no config.json)")
        if not (p / "adapter" / WEIGHTS).exists():
            raise UserError(f"{p}: run has no adapter yet (adapter/{WEIGHTS} missing)")
        return cls(p)

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def config(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.path / 'config.json'}:{exc.lineno}: invalid JSON: {exc.msg}") from None

    def base_model(self) -> Path:
        """The original (full-precision) base model directory the adapter was trained on."""
        info = self.config().get("base_model") or {}
        path = Path(info.get("path", ""))
        if not info or not path.is_dir():
            from common.models import resolve_model

            spec = self.config().get("model", "default")
            return resolve_model(spec, self.config().get("revision")).path
        return path

    def system_prompt(self) -> str | None:
        f = self.path / "system_prompt.txt"
        return f.read_text(encoding="utf-8") if f.exists() else None

    def chat_template_override(self) -> str | None:
        return self.config().get("chat_template")

    def summary(self) -> dict[str, Any]:
        f = self.path / "summary.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


# ---------------------------------------------------------------------------
# one writer per run directory

LOCK_FILE = ".llm-ft.lock"  # exists only while a command writes into the run


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def _holder(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (it has not written its pid yet)"
    return (f"'{info.get('command', 'llm-ft')}' (pid {info.get('pid')} on {info.get('host')}, "
            f"since {info.get('since', '?')})")


class RunLock:
    """An exclusive lock on a run directory, held while a command writes into it.

    An OS lock (``fcntl.flock``) decides: the kernel drops it when the holder dies, so a lock
    left by a killed run is never in the way. The file also records the holder's pid, host and
    command for the refusal message; where the OS lock is unavailable (no ``fcntl``, a filesystem
    without locks) that record decides, and a record whose pid is dead on this host is stale.
    """

    def __init__(self, run_dir: str | Path, command: str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.command = command
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> RunLock:
        from common.io import write_error

        try:
            if not self.run_dir.exists():
                self.run_dir.mkdir(parents=True)
                self._created_dir = True
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if not self._os_lock(fd):
                    os.close(fd)
                    raise UserError(f"{self.run_dir}: in use by {_describe(_holder(self.path))}; one command "
                                    "at a time writes into a run: wait for it to finish, or stop it")
                try:  # the holder before us may have removed the file between our open and our lock
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    self._fd = fd
                else:
                    os.close(fd)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            os.ftruncate(self._fd, 0)
            os.write(self._fd, (json.dumps(record) + "\n").encode())
        except OSError as exc:
            self.release()
            raise write_error(self.path, exc) or exc from None
        return self

    def _os_lock(self, fd: int) -> bool:
        """True when this process now holds the lock on ``fd``."""
        try:
            import fcntl
        except ImportError:  # Windows: the pid record alone
            return self._record_free()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without locks
                return self._record_free()
            raise

    def _record_free(self) -> bool:
        info = _holder(self.path)
        if not info or info.get("pid") == os.getpid():
            return True
        return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", 0)))

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: see the inode check in acquire
            os.close(self._fd)
            self._fd = None
        if self._created_dir:  # a command that failed before writing leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
            self._created_dir = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def has_run(path: Path) -> bool:
    """``path`` holds (part of) a run: a new ``train`` there would mix two runs."""
    return any((Path(path) / n).exists() for n in ("config.json", "adapter", "checkpoints", "metrics.jsonl"))


def lock_for_training(run_dir: Path, *, resume: bool) -> RunLock:
    """Take ``run_dir``'s lock for ``train``, then check (under the lock) that it may start there."""
    lock = RunLock(run_dir, "llm-ft train" + (" --resume" if resume else "")).acquire()
    try:
        if resume and not (run_dir / "checkpoints").is_dir():
            raise UserError(f"--resume: {run_dir} has no checkpoints/ to continue from")
        if not resume and has_run(run_dir):
            raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it, or choose another --out")
    except BaseException:
        lock.release()
        raise
    return lock
