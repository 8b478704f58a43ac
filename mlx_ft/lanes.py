"""CPU lanes: a micro-batch split into parts that run at once, one MLX CPU stream per core.

The Linux ``mlx[cpu]`` wheel bundles the reference (netlib) BLAS, which runs each matrix
product on one thread, and MLX runs a stream's operations one after another: a training step
on the CPU keeps one core busy however many there are. MLX gives each stream its own thread,
so the parts of a micro-batch, each traced on a stream of its own, run their forward and
backward passes side by side; their loss sums and gradients add up to the whole batch's (the
same step, with summation order the only difference).

A part is a set of whole rows; a batch with fewer rows than lanes (a packed row, typically)
has its rows cut at example (segment) boundaries first. Cutting there changes nothing: a
target counts only within its own segment, and each segment's positions restart at 0.
"""

from __future__ import annotations

import os
import sys

from common.train.backend import Batch

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


Row = tuple[list[int], list[int], list[int], list[int]]  # (ids, loss mask, segment ids, positions), unpadded


def _cut(row: Row) -> list[Row]:
    """``row`` as two rows cut at the segment boundary nearest its middle (or whole, if one segment)."""
    seg = row[2]
    starts = [t for t in range(1, len(seg)) if seg[t] != seg[t - 1]]
    if not starts:
        return [row]
    cut = min(starts, key=lambda t: abs(2 * t - len(seg)))
    return [tuple(x[:cut] for x in row), tuple(x[cut:] for x in row)]


def _batch(rows: list[Row], pad_id: int) -> Batch:
    width = max(len(r[0]) for r in rows)
    ids, mask, seg, pos = [], [], [], []
    for i, m, s, p in rows:
        fill = width - len(i)
        ids.append(list(i) + [pad_id] * fill)
        mask.append(list(m) + [0] * fill)
        seg.append(list(s) + [0] * fill)
        pos.append(list(p) + list(range(p[-1] + 1, p[-1] + 1 + fill)))  # padding continues (as make_batch pads)
    supervised = sum(map(sum, mask))  # a segment's first token is never marked (make_batch)
    return Batch(ids, mask, seg, pos, n_tokens=sum(len(r[0]) for r in rows), n_supervised=supervised)


def split(batch: Batch, lanes: int, pad_id: int) -> list[Batch]:
    """``batch`` as at most ``lanes`` batches of rows, balanced by tokens.

    While there are fewer rows than lanes, the longest row is cut at the segment boundary
    nearest its middle (if it has one); then the rows go, longest first, to the part with the
    fewest tokens. One lane, or one row that cannot be cut,
    returns ``[batch]`` unchanged.
    """
    if lanes <= 1:
        return [batch]
    rows: list[Row] = []
    for ids, mask, seg, pos in zip(batch.input_ids, batch.loss_mask, batch.segment_ids, batch.position_ids,
                                   strict=True):
        n = sum(1 for s in seg if s)  # padding is on the right
        rows.append((ids[:n], mask[:n], seg[:n], pos[:n]))
    while len(rows) < lanes:  # packed rows stay whole when there are rows enough: cutting adds padding
        longest = max(range(len(rows)), key=lambda k: len(rows[k][0]))
        pieces = _cut(rows[longest])
        if len(pieces) == 1:
            break
        rows[longest:longest + 1] = pieces
    if len(rows) == 1:
        return [batch]
    # longest row first, each to the part with the fewest tokens so far (parts differ by at most one row)
    parts: list[list[Row]] = [[] for _ in range(min(lanes, len(rows)))]
    load = [0] * len(parts)
    for row in sorted(rows, key=lambda r: -len(r[0])):
        k = load.index(min(load))
        parts[k].append(row)
        load[k] += len(row[0])
    return [_batch(p, pad_id) for p in parts]
