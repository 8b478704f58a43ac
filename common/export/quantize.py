"""Float32 rows -> GGUF tensor bytes, one row chunk at a time.

A tensor is produced in row chunks (see ``tensor_stream``), so every type here works on
any whole rows of a tensor and gives exactly the bytes gguf-py's ``gguf.quants.quantize``
gives for the same rows. f32/f16/bf16/q4_0 are gguf-py's own code; q8_0 is ours because
gguf-py's groups 16 rows at a time and rounds in four passes (5 s of a 17 s export of a 1B
model). Ours computes the same numbers in fewer, longer numpy passes (about 4x faster);
``tests/test_export_stream.py`` checks it byte for byte against gguf-py on real weights.
"""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
Q8_BLOCK = 32  # elements per q8_0 block: 2 bytes f16 scale + 32 int8
# The largest float32 below 0.5. trunc(v + copysign(HALF_DOWN, v)) rounds half away from
# zero exactly (as ggml's roundf and gguf-py's np_roundf) for |v| < 2**23: with 0.5 itself,
# 0.49999997 + 0.5 would round up to 1.
HALF_DOWN = np.nextafter(np.float32(0.5), np.float32(0))
SIGN_BIT = np.uint32(0x80000000)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Rows of float32 -> q8_0 bytes ``(rows, cols // 32 * 34)``, byte-identical to gguf-py's.

    Per block of 32: d = max|x| / 127 (stored as f16), q = roundf(x * (1/d)) as int8
    (q = 0 where d = 0), in float32 as ggml does.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    assert cols % Q8_BLOCK == 0, f"q8_0 rows of {cols} elements do not split into blocks of {Q8_BLOCK}"
    blocks = x.reshape(-1, Q8_BLOCK)
    n = blocks.shape[0]
    # max |x| per block: |x| written transposed, so the reduction runs over long rows
    # (numpy reduces a short last axis one row at a time, 2x slower)
    scratch = np.empty((Q8_BLOCK, n), dtype=np.float32)
    np.abs(blocks.T, out=scratch)
    d = np.maximum.reduce(scratch, axis=0)
    d /= np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    v = scratch.reshape(n, Q8_BLOCK)  # reused as block-major scratch
    np.multiply(blocks, inv[:, None], out=v)
    half = np.empty_like(v)  # copysign(HALF_DOWN, v), on the bits (faster than np.copysign)
    np.bitwise_and(v.view(np.uint32), SIGN_BIT, out=half.view(np.uint32))
    np.bitwise_or(half.view(np.uint32), HALF_DOWN.view(np.uint32), out=half.view(np.uint32))
    v += half
    out = np.empty((n, 2 + Q8_BLOCK), dtype=np.uint8)
    np.copyto(out[:, 2:].view(np.int8), v, casting="unsafe")  # float -> int8 truncates toward zero
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    return out.reshape(rows, -1)


def quantize_rows(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Whole rows of a float32 tensor (1-D: the whole tensor) as ``qtype`` data, as gguf-py writes it."""
    if qtype == Q.Q8_0 and x.ndim == 2:
        return quantize_q8_0(x)
    return gguf.quants.quantize(x, qtype)
