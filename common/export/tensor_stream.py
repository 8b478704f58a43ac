"""A GGUF's tensor data made on worker threads and handed to the writer in file order.

Every planned tensor is cut into chunks of whole rows (about ``CHUNK_ELEMS`` elements);
each chunk is merged, transformed and quantized on its own (rows of a merge are
independent, and every GGUF type here quantizes rows alone), so the work spreads over
threads even inside one large tensor, and memory is bounded by the chunk size, not the
tensor size. numpy releases the GIL in its loops, so ``worker_count()`` threads use that
many cores. Workers take chunks in file order and stop taking while ``budget`` bytes of
output are made but not yet written; the writer consumes them in order. Workers start
at construction: the work overlaps whatever the caller does before writing (building the
vocabulary, writing the header).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import numpy as np

from common.export.quantize import Q, quantize_rows

if TYPE_CHECKING:
    from common.export.arch import ArchSpec, HParams
    from common.export.merge import MergedModel

CHUNK_ELEMS = 1 << 18  # elements of a chunk: 1 MiB as float32, so a chunk's passes stay in cache
# (1B model, q8_0, one thread: 2.6 s at 2**18, 3.7 s at 2**16 and 2**20)
IN_FLIGHT_BYTES = 512 * 2**20  # output bytes made but not yet written, at most (plus one chunk per worker):
# how far the workers get ahead while the vocabulary and the header are prepared
MAX_WORKERS = 16  # beyond this the disk, not the CPU, limits a GGUF write


def worker_count() -> int:
    """Threads for tensor work: the CPUs this process may run on (its affinity, as containers set it)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


@functools.lru_cache(maxsize=1)
def _blas_thread_setters() -> tuple[Callable[[int], int], ...]:
    """OpenBLAS's ``openblas_set_num_threads_local`` (0.3.27+) of each OpenBLAS loaded (numpy's), Linux only."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    setters = []
    for path in sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        setters.append(fn)
    return tuple(setters)


def one_blas_thread() -> None:
    """Make BLAS calls from the calling thread single-threaded.

    Each worker is one core already; OpenBLAS's own threads on top of them oversubscribe
    the CPUs and spin (a q8_0 export of a 1B model on 2 CPUs: 25 s instead of 13 s).
    """
    for set_threads in _blas_thread_setters():
        set_threads(1)


class PlannedTensor(Protocol):
    """What is needed of a planned GGUF tensor (``gguf_file.Planned``)."""

    shape: tuple[int, ...]
    qtype: Q
    source: str | None
    data: np.ndarray | None

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of planned tensor ``tensor`` (a 1-D or whole tensor: all of it)."""

    tensor: int  # index into the plan
    start: int
    stop: int
    nbytes: int  # bytes of its GGUF data


def plan_chunks(plan: Sequence[PlannedTensor], chunk_elems: int = CHUNK_ELEMS) -> list[Chunk]:
    """Each planned tensor as chunks of whole rows, in file order."""
    chunks = []
    for i, p in enumerate(plan):
        if len(p.shape) != 2 or p.data is not None:
            chunks.append(Chunk(i, 0, p.shape[0] if p.shape else 1, p.nbytes))
            continue
        rows, row_bytes = p.shape[0], p.nbytes // p.shape[0]
        step = max(1, chunk_elems // max(1, p.shape[1]))
        chunks.extend(Chunk(i, a, min(rows, a + step), (min(rows, a + step) - a) * row_bytes)
                      for a in range(0, rows, step))
    return chunks


class OrderedWork:
    """``make(job)`` for each job on ``workers`` threads; :meth:`results` yields them in job order.

    Workers take jobs in order and wait while the jobs taken but not yet consumed hold
    ``budget`` bytes (``job.nbytes``); the job the consumer waits for is always taken
    (it is the oldest), so this cannot deadlock. An exception in ``make`` is raised by
    :meth:`results` at that job. Use as a context manager: leaving it stops the workers.
    """

    def __init__(self, jobs: Sequence[Chunk], make: Callable[[Chunk], np.ndarray], *, workers: int,
                 budget: int = IN_FLIGHT_BYTES):
        self.jobs, self.make, self.budget = jobs, make, budget
        self._cond = threading.Condition()
        self._next = 0  # next job to take
        self._in_flight = 0  # bytes of jobs taken and not yet consumed
        self._done: dict[int, tuple[np.ndarray | None, BaseException | None]] = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"gguf-tensors-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def _take(self) -> int | None:
        with self._cond:
            while True:
                if self._closed or self._next >= len(self.jobs):
                    return None
                nbytes = self.jobs[self._next].nbytes
                if self._in_flight == 0 or self._in_flight + nbytes <= self.budget:
                    k, self._next = self._next, self._next + 1
                    self._in_flight += nbytes
                    return k
                self._cond.wait()

    def _work(self) -> None:
        one_blas_thread()
        while (k := self._take()) is not None:
            try:
                result: tuple[np.ndarray | None, BaseException | None] = (self.make(self.jobs[k]), None)
            except BaseException as exc:  # handed to the consumer, raised there
                result = (None, exc)
            with self._cond:
                self._done[k] = result
                self._cond.notify_all()

    def results(self) -> Iterator[np.ndarray]:
        """Each job's result, in job order, as soon as it is made."""
        for k, job in enumerate(self.jobs):
            with self._cond:
                while k not in self._done:
                    self._cond.wait()
                data, exc = self._done.pop(k)
            if exc is not None:
                raise exc
            assert data is not None
            yield data
            del data
            with self._cond:
                self._in_flight -= job.nbytes
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the workers (each finishes the job it holds) and drop what was made; idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._done.clear()

    def __enter__(self) -> OrderedWork:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChunkMaker:
    """Makes one chunk's GGUF data: merged rows -> architecture transform -> quantized.

    A tensor's row reader (its adapter factors, converted once) and row order live while
    its chunks are being made.
    """

    def __init__(self, plan: Sequence[PlannedTensor], chunks: Sequence[Chunk], merged: MergedModel, spec: ArchSpec,
                 hp: HParams):
        self.plan, self.merged, self.spec, self.hp = plan, merged, spec, hp
        self._lock = threading.Lock()
        self._open: dict[int, tuple[Callable, np.ndarray | None]] = {}
        self._left: dict[int, int] = {}  # chunks not yet made, per tensor
        for c in chunks:
            self._left[c.tensor] = self._left.get(c.tensor, 0) + 1

    def _reader(self, i: int) -> tuple[Callable, np.ndarray | None]:
        with self._lock:
            if i not in self._open:
                p = self.plan[i]
                assert p.source is not None
                read = self.merged.row_reader(p.source)
                if read is None:  # rows not computable alone (DoRA on Conv1D): merged whole, once per tensor
                    read = self.merged.float32(p.source).__getitem__
                self._open[i] = (read, self.spec.row_order(p.source, p.shape[0], self.hp))
            return self._open[i]

    def _finished(self, i: int) -> None:
        with self._lock:
            self._left[i] -= 1
            if self._left[i] == 0:
                self._open.pop(i, None)

    def __call__(self, chunk: Chunk) -> np.ndarray:
        p = self.plan[chunk.tensor]
        if p.data is not None:  # generated (rope_freqs, ...)
            out = quantize_rows(p.data.astype(np.float32), p.qtype)
        else:
            assert p.source is not None
            if len(p.shape) != 2:  # 1-D: one chunk, the whole tensor
                out = quantize_rows(self.spec.transform(p.source, self.merged.float32(p.source), self.hp), p.qtype)
            else:
                read, order = self._reader(chunk.tensor)
                sel = slice(chunk.start, chunk.stop) if order is None else order[chunk.start:chunk.stop]
                out = quantize_rows(self.spec.transform_values(p.source, read(sel)), p.qtype)
                self._finished(chunk.tensor)
        out = np.ascontiguousarray(out)
        assert out.nbytes == chunk.nbytes, f"chunk of tensor {chunk.tensor}: {out.nbytes} bytes, planned {chunk.nbytes}"
        return out


class StreamedTensor:
    """A tensor as ``gguf.GGUFWriter.write_tensor_data`` uses it (``nbytes``, ``tofile``), whose
    data arrives as chunks: the writer keeps its state, alignment and padding rules."""

    def __init__(self, nbytes: int, chunks: Iterator[np.ndarray]):
        self.nbytes = nbytes
        self._chunks = chunks

    def tofile(self, fout: IO[bytes]) -> None:
        written = 0
        for data in self._chunks:
            fout.write(data.data)
            written += data.nbytes
        assert written == self.nbytes, f"streamed {written} bytes of a {self.nbytes}-byte tensor"
