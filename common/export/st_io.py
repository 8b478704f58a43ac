"""A small safetensors reader/writer on numpy that understands bfloat16.

``safetensors.numpy`` cannot load BF16 (numpy has no bfloat16) and can only write a
whole dict at once. Merging streams tensor by tensor, so we read the format ourselves
(8-byte little-endian header length, JSON header, raw little-endian data) through
``np.memmap`` and write shards incrementally: the header is known up front (merged
tensors keep their base shapes and dtypes), then each tensor's bytes are appended as
they are produced. BF16 travels as ``uint16`` bit patterns; arithmetic happens in fp32.
Files written here are ordinary safetensors (tests read them back with
``safetensors.safe_open``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from common.errors import UserError

# safetensors dtype name -> numpy storage dtype (BF16 stored as its uint16 bit pattern)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
CHUNK_ELEMS = 1 << 20  # elements processed at a time when merging or casting (4 MiB of fp32)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    out = np.empty(np.shape(bits), dtype=np.uint32)  # one allocation: the result itself
    out[...] = bits
    out <<= 16
    return out.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def to_float32(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    """A stored tensor as a new float32 array."""
    if st_dtype == "BF16":
        return bf16_to_f32(raw)
    return np.asarray(raw, dtype=np.float32).copy() if raw.dtype == np.float32 else raw.astype(np.float32)


def from_float32(x: np.ndarray, st_dtype: str) -> np.ndarray:
    """A float32 array in the storage dtype ``st_dtype`` (BF16 -> uint16 bits)."""
    if st_dtype == "BF16":
        return f32_to_bf16(x)
    return x.astype(DTYPES[st_dtype], copy=False)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafeTensorsFile:
    """Read-only view of one .safetensors file; tensors are memory-mapped, not loaded."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 * 2**20:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as exc:
            raise UserError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self.data_start = 8 + n
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            if meta["dtype"] not in DTYPES:
                raise UserError(f"{self.path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
            b, e = meta["data_offsets"]
            self.tensors[name] = TensorInfo(meta["dtype"], tuple(meta["shape"]), b, e)
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def raw(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only memmap in its storage dtype (BF16 as uint16)."""
        info = self.tensors[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mm[self.data_start + info.begin: self.data_start + info.end]
        return buf.view(DTYPES[info.dtype]).reshape(info.shape)

    def float32(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array."""
        return to_float32(self.raw(name), self.tensors[name].dtype)


class SafeTensorsModel:
    """All tensors of a model directory: ``model.safetensors`` or an indexed set of shards."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.dir}: no *.safetensors weights (only safetensors checkpoints are read)")
        self.files = [SafeTensorsFile(self.dir / f) for f in files]
        self._where: dict[str, SafeTensorsFile] = {}
        for f in self.files:
            for name in f.keys():
                self._where[name] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].tensors[name]

    def raw(self, name: str) -> np.ndarray:
        return self._where[name].raw(name)

    def float32(self, name: str) -> np.ndarray:
        return self._where[name].float32(name)


# ---------------------------------------------------------------------------
# writing


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None) -> tuple[bytes, list[int]]:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
        sizes.append(n)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text, sizes


class ShardedWriter:
    """Write tensors in a planned order into shards of at most ``max_shard_bytes``.

    ``plan`` is ``[(name, dtype, shape), ...]``; :meth:`write` must then be called once
    per tensor in that order. One shard -> ``model.safetensors``; several ->
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.
    """

    def __init__(self, out_dir: str | Path, plan: list[tuple[str, str, tuple[int, ...]]],
                 max_shard_bytes: int = 2 * 2**30):
        self.out_dir = Path(out_dir)
        self.plan = plan
        shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            n = int(np.prod(entry[2], dtype=np.int64)) * DTYPES[entry[1]].itemsize
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        self.shards = shards
        n_shards = len(shards)
        self.names = (["model.safetensors"] if n_shards == 1 else
                      [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)])
        self._shard = -1
        self._pos = 0  # index within the current shard
        self._fh: BinaryIO | None = None
        self._next = 0  # index into plan
        self.total_bytes = sum(int(np.prod(s, dtype=np.int64)) * DTYPES[d].itemsize for _, d, s in plan)

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard += 1
        self._pos = 0
        header, _ = _header_bytes(self.shards[self._shard], {"format": "pt"})
        self._fh = open(self.out_dir / self.names[self._shard], "wb")
        self._fh.write(header)

    def write(self, name: str, data: np.ndarray) -> None:
        """Append tensor ``name``; ``data`` is float32 (cast here, in chunks) or already in the storage dtype."""
        expected, dtype, shape = self.plan[self._next]
        assert name == expected, f"writer expected tensor {expected!r}, got {name!r}"
        assert tuple(data.shape) == tuple(shape), f"{name}: shape {data.shape} != planned {shape}"
        if self._fh is None or self._pos >= len(self.shards[self._shard]):
            self._open_next()
        assert self._fh is not None
        flat = data.reshape(-1)
        if data.dtype == np.float32 and dtype in FLOAT_DTYPES and dtype != "F32":
            for i in range(0, flat.size, CHUNK_ELEMS):
                self._fh.write(from_float32(flat[i:i + CHUNK_ELEMS], dtype).tobytes())
        else:
            assert data.dtype == DTYPES[dtype], f"{name}: dtype {data.dtype} does not match {dtype}"
            for i in range(0, flat.size, CHUNK_ELEMS):
                self._fh.write(np.ascontiguousarray(flat[i:i + CHUNK_ELEMS]).tobytes())
        self._pos += 1
        self._next += 1

    def close(self) -> None:
        """Finish the last shard and write the index when there are several."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        assert self._next == len(self.plan), f"wrote {self._next} of {len(self.plan)} planned tensors"
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def iter_chunks(n_rows: int, row_elems: int) -> Iterator[tuple[int, int]]:
    """Row ranges covering ``n_rows`` rows, each about CHUNK_ELEMS elements."""
    step = max(1, CHUNK_ELEMS // max(1, row_elems))
    for i in range(0, n_rows, step):
        yield i, min(n_rows, i + step)
