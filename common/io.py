"""Atomic file writes: temporary name in the same directory, fsync, rename.

A crash or a full disk never leaves a half-written file under a final name, and a
failed write never clobbers an existing good file. A write the system refuses (disk full,
file-size limit, read-only or missing folder) is reported as one :class:`WriteError` line
naming the file, whichever library did the writing.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError

# Errors that mean "this place cannot take the write", not "the program is wrong".
WRITE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large: over the file-size limit (ulimit -f) or the filesystem's",
                errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOTDIR: "a parent path is a file, not a folder",
                errno.EEXIST: "a file is in the way of a folder", errno.EIO: "input/output error",
                errno.ENOENT: "its folder cannot be created there"}
# safetensors (Rust) and some other libraries report the OS error only in their message.
_OS_CODE = re.compile(r"(?:os error |code: )(\d+)")


class WriteError(UserError, OSError):
    """A write the system refused, as one line naming the file. Also an ``OSError``, so code
    that tolerates a failed write (a cache index, say) still catches it."""


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: its ``errno``, or one quoted in its message."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    m = _OS_CODE.search(str(exc))
    return int(m.group(1)) if m else None


def write_error(path: str | os.PathLike, exc: BaseException, kept: str = "") -> WriteError | None:
    """``exc`` as a :class:`WriteError` about ``path`` when it is a refused write, else None."""
    if isinstance(exc, UserError):
        return None
    code = os_errno(exc)
    if code not in WRITE_ERRNOS:
        return None
    err = WriteError(f"{path}: cannot write ({WRITE_ERRNOS[code]})" + (f"; {kept}" if kept else ""))
    err.errno = code
    return err


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any long work, an output path that cannot be written: its nearest existing
    ancestor is a file, or a folder this process may not write into. Creates nothing."""
    target = Path(path).absolute()
    if target.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: cannot write ({WRITE_ERRNOS[errno.ENOTDIR]}: {ancestor})")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot write ({WRITE_ERRNOS[errno.EACCES]})")


def _kept(final: Path) -> str:
    return "the existing one is unchanged" if final.exists() else "nothing was written"


def _make_parent(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(final, exc) or exc from None


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask, read once: reading it means setting it, which would race other threads' writes."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the final file the mode a plain open() would
    (Ollama's service user must be able to read an exported GGUF and Modelfile)."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync it and rename it over ``final``."""
    final = Path(final)
    _make_parent(final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise write_error(final, exc, _kept(final)) or exc from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _normal_mode(tmp_path, is_dir=False)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        err = write_error(final, exc, _kept(final))
        if err is not None:
            raise err from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in whole.

    An existing ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    _make_parent(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise write_error(final, exc, _kept(final)) or exc from None
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as fh:
                    os.fsync(fh.fileno())
        _normal_mode(tmp, is_dir=True)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        name = final
        if isinstance(exc, OSError) and exc.filename and str(exc.filename).startswith(str(tmp)):
            name = final / Path(exc.filename).relative_to(tmp)  # the file inside, under its final name
        err = write_error(name, exc, _kept(final))
        if err is not None:
            raise err from None
        raise


def append_jsonl(path: str | os.PathLike, obj) -> None:
    """Append one JSON line and flush it to disk (logs survive a crash)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(path, exc, "the lines before are intact") or exc from None


def free_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
