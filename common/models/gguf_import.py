"""Import a local ``.gguf`` file as a Hugging Face-style model directory, once.

The result lives under ``$LLM_FT_HOME/models/<name>-<sha256[:16]>/`` (default
``LLM_FT_HOME=~/.cache/llm-ft``), keyed by the file's SHA-256, so a file is imported once
however often it is named. The directory is built under a temporary name and renamed
into place whole (common.io.atomic_dir): an interrupted import leaves nothing behind.

Weights are dequantized with the ``gguf`` package (numpy only: no torch) into float32
safetensors with Hugging Face names; the header is validated by our own bounds-checked
scan first (gguf_check). ``llm_ft_import.json`` records the source and its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from common import io
from common.errors import UserError
from common.models import gguf_arch
from common.models.gguf_check import scan_header

IMPORT_RECORD = "llm_ft_import.json"
IMPORTER_VERSION = 2  # bump when the output of an import changes; older imports are then redone
SHARD_BYTES = 2 << 30  # float32 bytes per safetensors shard: bounds the memory an import needs
HASH_CHUNK = 16 << 20


def llm_ft_home() -> Path:
    """``$LLM_FT_HOME`` or ``~/.cache/llm-ft``: where imports and other caches live."""
    return Path(os.environ.get("LLM_FT_HOME") or Path.home() / ".cache" / "llm-ft").expanduser()


def models_home() -> Path:
    return llm_ft_home() / "models"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 16 MiB chunks; remembered by (path, size, mtime) in the home index."""
    st = path.stat()
    index_file = models_home() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(key), str):
        return index[key]
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    digest = hashlib.sha256()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                        transient=True)
    with progress, open(path, "rb") as fh:
        task = progress.add_task(f"hashing {path.name}", total=st.st_size)
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            progress.advance(task, len(chunk))
    value = digest.hexdigest()
    index = index if isinstance(index, dict) else {}
    index[key] = value
    try:
        io.write_json(index_file, index)
    except OSError:  # a read-only home only costs a re-hash next time
        pass
    return value


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return name[:80] or "model"


def find_import(sha256: str) -> Path | None:
    """The complete import of the file with this hash, if there is one."""
    home = models_home()
    if not home.is_dir():
        return None
    for d in sorted(home.glob(f"*-{sha256[:16]}")):
        try:
            record = json.loads((d / IMPORT_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("sha256") == sha256 and record.get("importer_version") == IMPORTER_VERSION:
            return d
    return None


def import_gguf(path: str | os.PathLike, name: str | None = None, rename: bool = False) -> Path:
    """Import ``path`` (a .gguf file) and return the model directory; reuse an earlier import.

    ``name`` names a new import (default: the file's stem); with ``rename``, an earlier import
    of the same file under another name is renamed to it (``llm-ft models import --name``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    header = scan_header(path)  # cheap and bounded: a bad file fails here, before hashing or mapping it
    sha = file_sha256(path)
    wanted = models_home() / f"{_safe_name(name or path.stem)}-{sha[:16]}"
    found = find_import(sha)
    if found is not None:
        if rename and name and found != wanted and not wanted.exists():
            os.replace(found, wanted)
            record = json.loads((wanted / IMPORT_RECORD).read_text(encoding="utf-8"))
            io.write_json(wanted / IMPORT_RECORD, {**record, "name": wanted.name})
            return wanted
        return found
    with io.atomic_dir(wanted) as tmp:
        _convert(path, header, tmp, sha, wanted.name)  # atomic_dir gives the folder ordinary permissions
    return wanted


def _read_metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def _convert(path: Path, header, out: Path, sha: str, final_name: str) -> None:
    import gguf
    import numpy as np
    from safetensors.numpy import save_file

    from common.models.gguf_tokenizer import write_gguf_vocab, write_tokenizer

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError) as exc:
        raise UserError(f"{path}: not a readable GGUF file: {exc}") from None
    meta = _read_metadata(reader)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{path}: GGUF metadata has no general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in tensors.items()}

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
        return np.ascontiguousarray(w, dtype=np.float32).reshape(shapes[name])

    try:
        config = gguf_arch.build_config(arch, meta, shapes, read)
    except UserError as exc:
        raise UserError(f"{path}: {exc.message}", exc.problems) from None
    names = gguf_arch.tensor_names(arch, config["num_hidden_layers"])
    unknown = [n for n in tensors if n not in names and n not in gguf_arch.CONFIG_ONLY_TENSORS]
    if unknown:
        raise UserError(f"{path}: {len(unknown)} tensor(s) have no Hugging Face equivalent in {arch!r}",
                        [f"tensor {n!r}" for n in unknown])
    fix = gguf_arch.weight_fix(arch, config)
    wanted = [n for n in tensors if n in names]

    # Plan shards from the header's sizes, then fill them one at a time (memory <= one shard).
    shards: list[list[str]] = [[]]
    filled = 0
    for n in wanted:
        nbytes = int(np.prod(shapes[n])) * 4
        if shards[-1] and filled + nbytes > SHARD_BYTES:
            shards.append([])
            filled = 0
        shards[-1].append(n)
        filled += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(f"importing {path.name}", total=len(wanted))
        for file, group in zip(files, shards, strict=True):
            arrays = {}
            for n in group:
                arrays[names[n]] = fix(names[n], read(n))
                weight_map[names[n]] = file
                total += arrays[names[n]].nbytes
                progress.advance(task)
            save_file(arrays, str(out / file), metadata={"format": "pt"})
            del arrays
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(
        json.dumps(gguf_arch.generation_config(config), indent=2) + "\n", encoding="utf-8")
    try:
        tokenizer = write_tokenizer(meta, out, max_length=config.get("max_position_embeddings"))
        write_gguf_vocab(reader.fields, out, meta)  # every tokenizer key as imported, for a faithful export
    except UserError as exc:
        raise UserError(f"{path}: {exc.message}", exc.problems) from None
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    record = {
        "source": str(path.resolve()), "sha256": sha, "size": header.file_size,
        "name": final_name, "architecture": arch, "model_type": config["model_type"],
        "general_name": meta.get("general.name"), "tensor_types": types, "tokenizer": tokenizer,
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "importer_version": IMPORTER_VERSION,
    }
    (out / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
