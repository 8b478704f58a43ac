"""GGUF tensor data made in row chunks on worker threads: our q8_0 byte for byte against
gguf-py's, the ordered worker pool (order, memory budget, errors, stopping), a GGUF
written by several threads in small chunks equal to one written by one thread whole, and
the output file written around the page cache (exact bytes; plain writes where refused).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from common.export.out_file import OutFile
from common.export.quantize import quantize_q8_0, quantize_rows
from common.export.st_io import SafeTensorsModel, bf16_to_f32, f32_to_bf16
from common.export.tensor_stream import MAX_WORKERS, Chunk, OrderedWork, plan_chunks, worker_count

Q = gguf.GGMLQuantizationType


def _q8_cases(model_dir: Path) -> list[np.ndarray]:
    """Every 2-D weight of a real (tiny) model, as float32 and as bf16-rounded values, and edge cases."""
    st = SafeTensorsModel(model_dir)
    weights = [st.float32(n) for n in st.keys() if len(st.info(n).shape) == 2]
    rng = np.random.default_rng(0)
    edge = rng.standard_normal((8, 64), dtype=np.float32)
    edge[0] = 0  # all-zero blocks: d = 0, q = 0
    edge[1, :32] = -edge[1, :32]
    edge[2, 5] = 1e4  # one large value per block
    edge[3] = np.float32(1e-30)  # tiny, d subnormal in f16
    halves = (rng.integers(-254, 255, (16, 64)) / 2).astype(np.float32)  # x * (1/d) lands on .5: round away from 0
    halves[:, 0] = 127  # so d = 1 exactly
    return weights + [bf16_to_f32(f32_to_bf16(w)) for w in weights] + [edge, halves, rng.standard_normal((4, 96)) * 6e4]


@pytest.mark.torch
def test_q8_0_is_byte_identical_to_gguf_py(tiny_model_dir):
    for x in _q8_cases(tiny_model_dir):
        x = np.asarray(x, dtype=np.float32)
        want = gguf.quants.quantize(x, Q.Q8_0)
        assert quantize_q8_0(x).tobytes() == want.tobytes()
        assert quantize_rows(x[1:3], Q.Q8_0).tobytes() == gguf.quants.quantize(x[1:3], Q.Q8_0).tobytes()


def test_plan_chunks_cover_every_row_once():
    class P:
        def __init__(self, shape, qtype, data=None):
            self.shape, self.qtype, self.data, self.source = shape, qtype, data, "x"

        @property
        def nbytes(self):
            block, size = gguf.GGML_QUANT_SIZES[self.qtype]
            return int(np.prod(self.shape)) // block * size

    plan = [P((64,), Q.F32), P((10, 64), Q.Q8_0), P((7, 32), Q.F16), P((4,), Q.F32, np.ones(4))]
    chunks = plan_chunks(plan, chunk_elems=3 * 64)
    for i, p in enumerate(plan):
        mine = [c for c in chunks if c.tensor == i]
        assert mine[0].start == 0 and mine[-1].stop == p.shape[0]
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:], strict=False))
        assert sum(c.nbytes for c in mine) == p.nbytes
    assert [c.stop - c.start for c in chunks if c.tensor == 1] == [3, 3, 3, 1]


def test_worker_count_follows_cpu_affinity():
    assert worker_count() == max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def _jobs(n: int, nbytes: int = 100) -> list[Chunk]:
    return [Chunk(i, 0, 1, nbytes) for i in range(n)]


def test_ordered_work_keeps_order_and_budget():
    jobs = _jobs(60)
    lock, live, peak = threading.Lock(), [0], [0]

    def make(job: Chunk) -> np.ndarray:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.002 * (job.tensor % 3))  # later jobs often finish first
        return np.full(job.nbytes, job.tensor % 256, dtype=np.uint8)

    out = []
    with OrderedWork(jobs, make, workers=4, budget=350) as work:
        for data in work.results():
            out.append(int(data[0]))
            with lock:
                live[0] -= 1
    assert out == [j.tensor % 256 for j in jobs]
    assert peak[0] <= 3  # 350 bytes of budget: at most three 100-byte jobs made and not yet consumed


def test_ordered_work_raises_the_failing_jobs_error_in_order():
    def make(job: Chunk) -> np.ndarray:
        if job.tensor == 5:
            raise ValueError("job 5 failed")
        return np.zeros(1, dtype=np.uint8)

    seen = []
    with OrderedWork(_jobs(20), make, workers=3) as work, pytest.raises(ValueError, match="job 5"):
        for _ in work.results():
            seen.append(1)
    assert len(seen) == 5


def test_ordered_work_close_stops_the_workers():
    made = []

    def make(job: Chunk) -> np.ndarray:
        made.append(job.tensor)
        return np.zeros(job.nbytes, dtype=np.uint8)

    work = OrderedWork(_jobs(1000), make, workers=2, budget=200)
    next(iter(work.results()))
    work.close()
    assert not any(t.is_alive() for t in work._threads)
    assert len(made) < 10  # the budget held the workers back; nothing more is made after close


@pytest.mark.torch
@pytest.mark.parametrize("quant", ["q8_0", "f16", "q4_0"])
def test_threaded_chunked_gguf_equals_single_thread_whole_tensors(tmp_path, quant):
    """Chunks made out of order by 4 threads, several per tensor (Q/K rows permuted), give the same file."""
    from test_merge import make_run

    from common.export.arch import load_hparams, spec_for
    from common.export.gguf_file import start_tensors, write_gguf
    from common.export.merge import open_merged
    from common.export.tokenizer import build_vocab

    run_dir = make_run(tmp_path, r=4, targets=["q_proj", "k_proj", "down_proj"])
    base, adapter = tmp_path / "base", run_dir / "adapter"
    hp = load_hparams(base)
    spec = spec_for(hp)
    merged = open_merged(base, adapter)
    vocab = build_vocab(base, merged.info("model.embed_tokens.weight").shape[0], pre_override="gpt-2")
    outs = {}
    for label, workers, chunk_elems, budget in (("one", 1, 1 << 30, None), ("many", 4, 100, 3000)):
        job = start_tensors(merged, hp, spec, quant, workers=workers, chunk_elems=chunk_elems)
        if budget is not None:
            job.work.budget = budget
        outs[label] = tmp_path / f"{label}.gguf"
        write_gguf(merged, hp, spec, vocab, outs[label], quant, name="t", progress=False, tensors=job)
        if label == "many":
            assert len(job.chunks) > 2 * len(job.plan)
    assert outs["one"].read_bytes() == outs["many"].read_bytes()
    # and each tensor equals gguf-py's quantization of the whole merged, transformed tensor
    reader = gguf.GGUFReader(str(outs["many"]))
    by_name = {t.name: t for t in reader.tensors}
    for p in job.plan:
        if p.source is None:
            continue
        want = gguf.quants.quantize(spec.transform(p.source, merged.float32(p.source), hp), p.qtype)
        assert by_name[p.name].data.tobytes() == want.tobytes(), p.name


@pytest.mark.parametrize("direct", [True, False])
def test_out_file_writes_exactly_the_bytes(tmp_path, direct):
    """Writes of any size across buffer boundaries give exactly those bytes (a direct tail padded, then cut)."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in (7, 4096, 300_000, 13, 1 << 20, 1)]
    out = OutFile(tmp_path / "f", buffer_bytes=1 << 16, direct=direct)
    for part in parts:
        assert out.write(part.data) == part.nbytes
    assert out.tell() == sum(p.nbytes for p in parts)
    out.close()
    out.close()
    assert (tmp_path / "f").read_bytes() == b"".join(p.tobytes() for p in parts)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_out_file_writes_plainly_where_direct_io_is_refused(tmp_path, monkeypatch, refused_at):
    """Regression guard: a filesystem without O_DIRECT (EINVAL at open, or at the first write) still gets the file."""
    import fcntl

    real_open, real_write, refused = os.open, os.write, []

    def fake_open(path, flags, *args):
        if refused_at == "open" and flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def fake_write(fd, data):
        if refused_at == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    data = np.arange(100_000, dtype=np.uint16)
    out = OutFile(tmp_path / "f", buffer_bytes=1 << 16)
    out.write(data.data)
    out.close()
    monkeypatch.undo()
    assert refused and not out.direct
    assert (tmp_path / "f").read_bytes() == data.tobytes()
