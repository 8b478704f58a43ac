"""CPU lanes: a micro-batch split into parts that run at once, one MLX CPU stream per core.

The Linux ``mlx[cpu]`` wheel bundles the reference (netlib) BLAS, which runs each matrix
product on one thread, and MLX runs a stream's operations one after another: a training step
on the CPU keeps one core busy however many there are. MLX gives each stream its own thread,
so the parts of a micro-batch, each traced on a stream of its own, run their forward and
backward passes side by side; their loss sums and gradients add up to the whole batch's (the
same step, with summation order the only difference).

A part is a set of whole rows; a batch with fewer rows than lanes (a packed row, typically)
has its rows cut at example (segment) boundaries first. Cutting there changes nothing: a
target counts only within its own example, and each example's positions restart at 0.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from common.rows import Example
from common.train.backend import Batch
from common.train.batching import make_batch

MAX_LANES = 8  # more streams than this only adds traces and memory for what one BLAS thread each does


def default_lanes(device_is_cpu: bool) -> int:
    """Lanes for this process: the cores it may use on Linux's CPU, else 1.

    On a Mac the CPU's BLAS (Accelerate) is threaded already, and GPUs run one stream.
    """
    if not device_is_cpu or not sys.platform.startswith("linux"):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - every Linux has it
        cores = os.cpu_count() or 1
    return max(1, min(MAX_LANES, cores))


Row = list[Example]  # a row as its examples (segments), in order


def _examples(batch: Batch, r: int) -> Row:
    """Row ``r`` of ``batch`` as its segments, padding dropped."""
    ids, mask, seg = batch.input_ids[r], batch.loss_mask[r], batch.segment_ids[r]
    out: Row = []
    for t, s in enumerate(seg):
        if s == 0:
            break  # padding is on the right
        if t == 0 or s != seg[t - 1]:
            out.append(Example([], []))
        out[-1].input_ids.append(ids[t])
        out[-1].loss_mask.append(mask[t])
    return out


def _size(row: Row) -> int:
    return sum(len(e) for e in row)


def _cut(row: Row) -> list[Row]:
    """``row`` as two rows cut at the example boundary nearest its middle (or whole, if one example)."""
    if len(row) < 2:
        return [row]
    ends = np.cumsum([len(e) for e in row])[:-1]  # token offset of each boundary
    k = 1 + int(np.argmin(np.abs(2 * ends - _size(row))))
    return [row[:k], row[k:]]


def split(batch: Batch, lanes: int, pad_id: int) -> list[Batch]:
    """``batch`` as at most ``lanes`` batches of rows, balanced by tokens.

    While there are fewer rows than lanes, the longest row is cut at the example boundary
    nearest its middle (if it has one); then the rows go, longest first, to the part with the
    fewest tokens. Each part is built by :func:`~common.train.batching.make_batch`. One lane,
    or one row that cannot be cut, returns ``[batch]`` unchanged.
    """
    if lanes <= 1:
        return [batch]
    rows = [_examples(batch, r) for r in range(len(batch.input_ids))]
    while len(rows) < lanes:  # packed rows stay whole when there are rows enough: cutting adds padding
        longest = max(range(len(rows)), key=lambda k: _size(rows[k]))
        pieces = _cut(rows[longest])
        if len(pieces) == 1:
            break
        rows[longest:longest + 1] = pieces
    if len(rows) == 1:
        return [batch]
    # longest row first, each to the part with the fewest tokens so far (parts differ by at most one row)
    parts: list[list[Row]] = [[] for _ in range(min(lanes, len(rows)))]
    load = [0] * len(parts)
    for row in sorted(rows, key=lambda r: -_size(r)):
        k = load.index(min(load))
        parts[k].append(row)
        load[k] += _size(row)
    return [make_batch(p, pad_id) for p in parts]
