"""A bounds-checked pre-scan of a GGUF file's header, before anything trusts it.

``gguf.GGUFReader`` memory-maps the file and believes every count and length in it: a
crafted or truncated file can make it allocate wildly, loop for a very long time or read
past the end. This scan walks the same structure with ``struct`` on a memory map, checking
each count, string length, array length and tensor extent against the bytes that remain.
Every loop is bounded by the file size (each item consumes at least one byte), so it
never hangs. Only then is the file handed to ``GGUFReader``.

Format (little-endian, versions 2 and 3): magic ``GGUF``, u32 version, u64 tensor count,
u64 metadata count, the key/value pairs, the tensor infos (name, u32 n_dims, u64 dims,
u32 ggml type, u64 offset), padding to ``general.alignment`` (default 32), tensor data.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError

GGML_MAX_DIMS = 4  # ggml's limit on tensor rank
MAX_KEY_BYTES = 1 << 16  # a key or tensor name longer than 64 KiB is not a real file
MAX_ARRAY_DEPTH = 3  # nested arrays are legal; real files use one level

# GGUFValueType -> (struct format, bytes) for the fixed-size scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # ggml order: fastest-varying first (the reverse of numpy/torch)
    offset: int  # from the start of the data section, in bytes
    n_bytes: int


@dataclass
class GGUFHeader:
    path: Path
    file_size: int
    version: int
    alignment: int
    data_offset: int  # absolute byte offset of the data section
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars and strings; arrays as their length
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None


class _Bad(Exception):
    pass


class _Cursor:
    """Reads little-endian values from a buffer, refusing to go past its end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Bad(f"{what} needs {n} bytes at byte {self.pos}, but the file has {self.size - self.pos} left "
                       "(truncated or corrupt)")

    def unpack(self, fmt: str, n: int, what: str):
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str, limit: int | None = None, decode: bool = True) -> str | None:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise _Bad(f"{what} is {n} bytes long (limit {limit}) at byte {self.pos - 8}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n]) if decode else None
        self.pos += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} at byte {self.pos - n} is not valid UTF-8") from None


def _min_item_bytes(vtype: int) -> int:
    if vtype in _SCALARS:
        return _SCALARS[vtype][1]
    if vtype == _STRING:
        return 8
    if vtype == _ARRAY:
        return 12
    raise _Bad(f"unknown value type {vtype}")


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    """Read (or, for arrays, skip over) one value; arrays come back as their length."""
    if vtype in _SCALARS:
        fmt, n = _SCALARS[vtype]
        return cur.unpack(fmt, n, f"value of {key!r}")
    if vtype == _STRING:
        return cur.string(f"string value of {key!r}")
    if vtype != _ARRAY:
        raise _Bad(f"key {key!r} has unknown value type {vtype} at byte {cur.pos - 4}")
    if depth >= MAX_ARRAY_DEPTH:
        raise _Bad(f"key {key!r}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
    itype = cur.u32(f"array type of {key!r}")
    count = cur.u64(f"array length of {key!r}")
    item = _min_item_bytes(itype)
    if count * item > cur.size - cur.pos:
        raise _Bad(f"key {key!r}: array of {count} items cannot fit in the {cur.size - cur.pos} bytes left (truncated or corrupt)")
    if itype in _SCALARS:
        cur.pos += count * item
    elif itype == _STRING:
        for i in range(count):  # bounded: each string consumes >= 8 bytes, checked above
            cur.string(f"item {i} of {key!r}", decode=False)
    else:
        for _ in range(count):
            _value(cur, itype, key, depth + 1)
    return count


def scan_header(path: str | os.PathLike) -> GGUFHeader:
    """Validate a GGUF file's structure against its size; raise UserError naming the problem.

    Checks the magic, the version, every count and length, tensor ranks, types, dims,
    alignment, and that each tensor's bytes lie inside the file. Reads only the header.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path}: GGUF file not found") from None
    if size < 24:
        raise UserError(f"{path}: not a GGUF file: only {size} bytes (a GGUF header alone is 24)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _scan(path, buf, size)
        except _Bad as exc:
            raise UserError(f"{path}: not a valid GGUF file: {exc}") from None


def _scan(path: Path, buf, size: int) -> GGUFHeader:
    import gguf

    cur = _Cursor(buf, size)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        hint = " (an old GGML/GGJT file: convert it with a current llama.cpp)" if magic in (
            b"lmgg", b"fmgg", b"tjgg") else ""
        raise _Bad(f"wrong magic {magic!r}, expected b'GGUF'{hint}")
    cur.pos = 4
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version != 0:
        raise _Bad("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise _Bad(f"version {version} is not supported (expected 2 or 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    left = size - cur.pos
    if n_kv * 13 > left:  # smallest pair: 8-byte key length + 4-byte type + 1-byte value
        raise _Bad(f"metadata count {n_kv} cannot fit in the {left} bytes left (truncated or corrupt)")
    if n_tensors * 24 > left:  # smallest tensor info: name length, n_dims, type, offset
        raise _Bad(f"tensor count {n_tensors} cannot fit in the {left} bytes left (truncated or corrupt)")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata pair {i}", limit=MAX_KEY_BYTES)
        if key in metadata:
            raise _Bad(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"type of {key!r}")
        metadata[key] = _value(cur, vtype, key)

    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Bad(f"general.alignment must be a power of two, got {alignment!r}")

    sizes = gguf.GGML_QUANT_SIZES
    infos: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", limit=MAX_KEY_BYTES)
        if name in names:
            raise _Bad(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = cur.u32(f"rank of tensor {name!r}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise _Bad(f"tensor {name!r} has rank {n_dims} (expected 1..{GGML_MAX_DIMS})")
        dims = tuple(cur.u64(f"dims of tensor {name!r}") for _ in range(n_dims))
        gtype = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"offset of tensor {name!r}")
        try:
            qtype = gguf.GGMLQuantizationType(gtype)
            block, type_bytes = sizes[qtype]
        except (ValueError, KeyError):
            raise _Bad(f"tensor {name!r} has unknown ggml type {gtype}") from None
        n_elements = 1
        for d in dims:
            if d == 0:
                raise _Bad(f"tensor {name!r} has a zero dimension {dims}")
            n_elements *= d
            if n_elements > size * 8:  # more elements than bits in the file: cannot be stored in it
                raise _Bad(f"tensor {name!r} with dims {dims} is larger than the file")
        if dims[0] % block:
            raise _Bad(f"tensor {name!r}: first dimension {dims[0]} is not a multiple of the "
                       f"{qtype.name} block size {block}")
        if offset % alignment:
            raise _Bad(f"tensor {name!r}: data offset {offset} is not aligned to {alignment}")
        infos.append(TensorInfo(name, gtype, dims, offset, n_elements // block * type_bytes))

    data_offset = cur.pos + (-cur.pos % alignment)
    for t in infos:
        end = data_offset + t.offset + t.n_bytes
        if end > size:
            raise _Bad(f"tensor {t.name!r} ({t.n_bytes} bytes at data offset {t.offset}) ends at byte {end}, "
                       f"beyond the end of the file ({size} bytes): the file is truncated or corrupt")
    ordered = sorted(infos, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.offset + a.n_bytes > b.offset:
            raise _Bad(f"tensors {a.name!r} and {b.name!r} overlap")
    return GGUFHeader(path, size, version, alignment, data_offset, metadata, infos)
