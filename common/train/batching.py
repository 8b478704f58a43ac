"""Batches without waste: pad to the batch's longest row, group by length, or pack.

An epoch's plan is a pure function of ``(seed, epoch, lengths, settings)``: a list of
micro-batches, each a list of rows, each row a list of example indices (one index per
row unless packing). A position in training is therefore just ``(epoch, index)`` into
that plan, which is what a checkpoint stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.rows import Example
from common.train.backend import Batch

MEGA_BATCHES = 50  # length grouping sorts within windows of 50 batches (as Hugging Face's sampler does)
PACK_WINDOW = 64  # packing tries the last 64 open rows for room (first-fit, bounded cost)

Plan = list[list[list[int]]]  # micro-batches -> rows -> example indices


def make_batch(examples: Sequence[Sequence[Example]], pad_id: int) -> Batch:
    """Build a right-padded :class:`Batch`; each inner sequence is one row (several = packed).

    The first token of every segment is never a loss target: nothing before it in its own
    example predicts it, and a packed row must not learn one example from another.
    """
    rows_ids, rows_mask, rows_seg, rows_pos = [], [], [], []
    for row in examples:
        ids: list[int] = []
        mask: list[int] = []
        seg: list[int] = []
        pos: list[int] = []
        for k, ex in enumerate(row, start=1):
            n = len(ex.input_ids)
            ids += ex.input_ids
            mask += [0] + list(ex.loss_mask[1:])
            seg += [k] * n
            pos += list(range(n))
        rows_ids.append(ids)
        rows_mask.append(mask)
        rows_seg.append(seg)
        rows_pos.append(pos)
    width = max((len(r) for r in rows_ids), default=0)
    n_tokens = sum(len(r) for r in rows_ids)
    n_supervised = sum(sum(m) for m in rows_mask)
    for ids, mask, seg, pos in zip(rows_ids, rows_mask, rows_seg, rows_pos, strict=True):
        pad = width - len(ids)
        start = pos[-1] + 1 if pos else 0
        ids += [pad_id] * pad
        mask += [0] * pad
        seg += [0] * pad
        pos += list(range(start, start + pad))  # padding continues the positions (in range, never attended)
    return Batch(rows_ids, rows_mask, rows_seg, rows_pos, n_tokens=n_tokens, n_supervised=n_supervised)


def pack(order: Sequence[int], lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Pack examples (in ``order``) into rows of at most ``max_len`` tokens, first fit."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        start = max(0, len(rows) - PACK_WINDOW)
        for r in range(start, len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def epoch_plan(lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
               packing: bool = False, max_len: int = 0) -> Plan:
    """The micro-batches of one training epoch (seeded; every example exactly once)."""
    n = len(lengths)
    if n == 0:
        return []
    rng = _rng(seed, epoch)
    order = rng.permutation(n).tolist()
    if packing:
        rows = pack(order, lengths, max_len)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if group_by_length:
        # Sort by length inside windows of MEGA_BATCHES batches, then shuffle the batches:
        # little padding, and still a different mix of batches every epoch.
        window = batch_size * MEGA_BATCHES
        batches = []
        for w in range(0, n, window):
            chunk = sorted(order[w:w + window], key=lambda i: -lengths[i])
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        perm = rng.permutation(len(batches)).tolist()
        batches = [batches[p] for p in perm]
    else:
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [[[i] for i in b] for b in batches]


def eval_plan(lengths: Sequence[int], *, batch_size: int, packing: bool = False, max_len: int = 0) -> Plan:
    """Validation micro-batches: longest first, no shuffling (order does not change a sum)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if packing:
        rows = pack(order, lengths, max_len)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return [[[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


@dataclass
class Position:
    epoch: int = 0
    index: int = 0  # the next micro-batch within the epoch's plan


class DataStream:
    """An endless stream of training micro-batches across epochs, resumable by position."""

    def __init__(self, examples: Sequence[Example], *, batch_size: int, seed: int, pad_id: int,
                 group_by_length: bool = True, packing: bool = False, max_len: int = 0,
                 position: Position | None = None, build=None):
        self.examples = examples
        self.lengths = [len(e) for e in examples]
        self.kw = dict(batch_size=batch_size, seed=seed, group_by_length=group_by_length, packing=packing,
                       max_len=max_len)
        self.pad_id = pad_id
        # rows of examples -> Batch: the method's batch builder (preference pairs), else make_batch
        self.build = build or (lambda rows: make_batch(rows, pad_id))
        self.position = position or Position()
        self._plans: dict[int, Plan] = {}

    def plan(self, epoch: int) -> Plan:
        if epoch not in self._plans:
            self._plans = {epoch: epoch_plan(self.lengths, epoch=epoch, **self.kw)}  # keep one epoch in memory
        return self._plans[epoch]

    def micro_batches_for(self, epochs: float) -> int:
        """How many micro-batches ``epochs`` passes take (a fraction counts part of the last pass)."""
        whole = math.floor(epochs)
        total = sum(len(epoch_plan(self.lengths, epoch=e, **self.kw)) for e in range(whole))
        if epochs > whole:
            total += math.ceil((epochs - whole) * len(epoch_plan(self.lengths, epoch=whole, **self.kw)))
        return total

    def next(self) -> tuple[Batch, list[int]]:
        """The next micro-batch and the indices of the examples in it."""
        if not self.examples:
            raise ValueError("no training examples")
        plan = self.plan(self.position.epoch)
        if self.position.index >= len(plan):
            self.position = Position(self.position.epoch + 1, 0)
            plan = self.plan(self.position.epoch)
        rows = plan[self.position.index]
        self.position = Position(self.position.epoch, self.position.index + 1)
        batch = self.build([[self.examples[i] for i in row] for row in rows])
        return batch, [i for row in rows for i in row]
