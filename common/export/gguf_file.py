"""Write a model GGUF with gguf-py, streamed: plan every tensor's name, shape and type,
write header + metadata + tensor infos, then append each tensor's data as worker threads
make it (merge -> architecture transform -> quantize, in row chunks: ``tensor_stream``).
Peak memory is bounded by the chunks in flight, whatever the model size.

Types in Python (``gguf.quants``): f32, f16, bf16, q8_0, q4_0. K-quants (q4_k_m, ...)
go through llama.cpp's own quantizer (``llama_model_quantize`` from llama-cpp-python)
on an f16 intermediate, so its per-tensor rules (which tensors get more bits) apply.
Type rules for the Python path follow llama.cpp's converter: 1-D tensors, norms and
biases stay f32; a row length that does not divide into quant blocks falls back to f16;
for q4_0 the output projection (or the tied embedding, which llama.cpp uses as output)
gets q8_0 (llama.cpp's quantizer would use q6_k, which gguf-py cannot write).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import gguf
import numpy as np

from common.errors import UserError
from common.export.arch import ArchSpec, HParams
from common.export.merge import MergedModel
from common.export.out_file import OutFile
from common.export.tensor_stream import (
    CHUNK_ELEMS,
    Chunk,
    ChunkMaker,
    OrderedWork,
    StreamedTensor,
    plan_chunks,
    worker_count,
)
from common.export.tokenizer import GGUFVocab
from common.io import atomic_path, free_bytes

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
# --quant name -> (default tensor type, file type) for types written in Python
PY_QUANTS: dict[str, tuple[Q, FT]] = {
    "f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16), "bf16": (Q.BF16, FT.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0),
}
# --quant name -> llama.cpp file type, for types made by llama.cpp's quantizer
LLAMA_CPP_QUANTS: dict[str, FT] = {
    "q2_k": FT.MOSTLY_Q2_K, "q3_k_m": FT.MOSTLY_Q3_K_M, "q4_k_s": FT.MOSTLY_Q4_K_S, "q4_k_m": FT.MOSTLY_Q4_K_M,
    "q5_k_s": FT.MOSTLY_Q5_K_S, "q5_k_m": FT.MOSTLY_Q5_K_M, "q6_k": FT.MOSTLY_Q6_K,
    "q4_1": FT.MOSTLY_Q4_1, "q5_0": FT.MOSTLY_Q5_0, "q5_1": FT.MOSTLY_Q5_1,
}
QUANTS = tuple(PY_QUANTS) + tuple(LLAMA_CPP_QUANTS)
SMALL_MODEL_PARAMS = 1_000_000_000  # below this, 4-bit costs too much accuracy (measured on SmolLM2-135M)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def default_quant(n_params: int) -> tuple[str, str]:
    """The default --quant for a model of ``n_params`` parameters, and why."""
    if n_params < SMALL_MODEL_PARAMS:
        return "q8_0", (f"{n_params / 1e6:.3g}M parameters (< 1B): q8_0, because 4-bit noticeably changes "
                        "the answers of small models")
    if llama_cpp_available():
        return "q4_k_m", f"{n_params / 1e9:.1f}B parameters: q4_k_m (4.8 bits/weight), llama.cpp's usual trade-off"
    return "q8_0", (f"{n_params / 1e9:.1f}B parameters: q4_k_m would fit better but needs llama.cpp's quantizer "
                    "(pip install 'llm-ft[verify]'); using q8_0")


@dataclass
class Planned:
    """One tensor of the output GGUF."""

    name: str  # GGUF name (blk.0.attn_q.weight)
    shape: tuple[int, ...]  # numpy (row-major) element shape
    qtype: Q
    source: str | None  # HF tensor name it is made from; None for generated tensors
    data: np.ndarray | None = None  # generated tensors (rope_freqs, ...)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape, dtype=np.int64))
        return n // block * size


def tensor_type(name: str, shape: tuple[int, ...], quant: str, is_output: bool) -> Q:
    """The GGML type of one tensor under ``quant`` (llama.cpp's converter rules)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    qtype = PY_QUANTS[quant][0]
    if qtype == Q.Q4_0 and is_output:
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16  # rows do not split into blocks: llama.cpp's converter falls back to f16
    return qtype


def plan_tensors(merged: MergedModel, spec: ArchSpec, hp: HParams, quant: str) -> list[Planned]:
    """Every output tensor in write order, with its GGUF name, shape and type."""
    tmap = spec.tensor_map(hp.n_layers)
    names = list(merged.names)
    has_lm_head = "lm_head.weight" in names
    if spec.always_tied and has_lm_head and merged.is_changed("lm_head.weight"):
        raise UserError(f"{spec.name}: llama.cpp always uses the embedding as the output projection, but the "
                        "adapter changes them differently (embed_tokens/lm_head in the adapter); cannot export")
    plan: list[Planned] = []
    problems = []
    embed_src = None
    for hf_name in names:
        if hf_name == "lm_head.weight" and spec.always_tied:
            continue
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            problems.append(f"tensor {hf_name!r} has no llama.cpp name for {spec.gguf_name}")
            continue
        shape = tuple(merged.info(hf_name).shape)
        if gname == "token_embd.weight":
            embed_src = hf_name
        is_output = gname == "output.weight" or (gname == "token_embd.weight" and not has_lm_head)
        plan.append(Planned(gname, shape, tensor_type(gname, shape, quant, is_output), hf_name))
    if problems:
        raise UserError(f"{merged.base_dir}: tensors llama.cpp would not know", problems)
    if spec.needs_output and not has_lm_head and embed_src is not None:
        shape = tuple(merged.info(embed_src).shape)
        plan.append(Planned("output.weight", shape, tensor_type("output.weight", shape, quant, True), embed_src))
    for gname, data in spec.extra_tensors(hp):
        plan.insert(0, Planned(gname, tuple(data.shape), Q.F32, None, data))
    return plan


def python_quant(quant: str, merged: MergedModel) -> str:
    """The type written in Python for ``quant``: itself, or for a K-quant llama.cpp's input (bf16/f16)."""
    if quant in PY_QUANTS:
        return quant
    return "bf16" if {merged.info(n).dtype for n in merged.names} == {"BF16"} else "f16"


@dataclass
class TensorJob:
    """The planned tensors of one GGUF, and the worker threads already making their data."""

    quant: str  # a PY_QUANTS type
    plan: list[Planned]
    chunks: list[Chunk]
    work: OrderedWork

    def tensors(self) -> Iterator[StreamedTensor]:
        """Each planned tensor in order, its data streamed chunk by chunk as the workers make it."""
        results = self.work.results()
        counts = Counter(c.tensor for c in self.chunks)
        for i, p in enumerate(self.plan):
            yield StreamedTensor(p.nbytes, islice(results, counts[i]))

    def close(self) -> None:
        self.work.close()


def start_tensors(merged: MergedModel, hp: HParams, spec: ArchSpec, quant: str, *, workers: int | None = None,
                  chunk_elems: int = CHUNK_ELEMS) -> TensorJob:
    """Plan the GGUF's tensors for ``quant`` and start making their data on ``workers`` threads
    (default: one per available CPU). Close the job (``write_gguf`` does) to stop them."""
    quant = python_quant(quant, merged)
    plan = plan_tensors(merged, spec, hp, quant)
    chunks = plan_chunks(plan, chunk_elems)
    work = OrderedWork(chunks, ChunkMaker(plan, chunks, merged, spec, hp), workers=workers or worker_count())
    return TensorJob(quant, plan, chunks, work)


def n_params(merged: MergedModel) -> int:
    """Parameters of the model (all tensors; a tied output counted once)."""
    return sum(int(np.prod(merged.info(n).shape, dtype=np.int64)) for n in merged.names)


@dataclass
class GGUFResult:
    path: Path
    quant: str
    n_tensors: int
    nbytes: int


def safe_model_name(name: str, vocab: GGUFVocab) -> str:
    """``general.name`` llama.cpp will not trip over.

    llama.cpp gives Phi-3's special tokens extra attributes when the model *name*
    contains "phi3"/"phi-3", looking up "<s>", "</s>", "<unk>" by text; a vocabulary
    without them makes loading fail. Such a name is altered only then.
    """
    lowered = name.lower()
    tokens = {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in vocab.tokens}
    if ("phi3" in lowered or "phi-3" in lowered) and not {"<s>", "</s>", "<unk>"} <= tokens:
        return lowered.replace("phi-3", "phi 3").replace("phi3", "phi 3")
    return name


def _metadata(w: gguf.GGUFWriter, hp: HParams, spec: ArchSpec, vocab: GGUFVocab, name: str, ftype: FT) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(safe_model_name(name, vocab))
    spec.params(w, hp)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(w)


def write_gguf_python(merged: MergedModel, hp: HParams, spec: ArchSpec, vocab: GGUFVocab, out: Path, quant: str,
                      *, name: str, progress: bool = True, tensors: TensorJob | None = None) -> GGUFResult:
    """Write ``merged`` as a GGUF of a Python-quantized type at ``out`` (atomically).

    ``tensors``: a job from :func:`start_tensors` (already working); closed here either way.
    """
    from rich.progress import track

    job = tensors if tensors is not None else start_tensors(merged, hp, spec, quant)
    try:
        assert job.quant == quant, f"tensor job for {job.quant}, writing {quant}"
        plan = job.plan
        if len(vocab.tokens) != plan_vocab_rows(plan):
            raise UserError(f"tokenizer has {len(vocab.tokens)} tokens but token_embd has {plan_vocab_rows(plan)} rows")
        total = sum(p.nbytes for p in plan)
        check_space(out, total + sum(len(t) for t in vocab.tokens) * 2)
        writer = gguf.GGUFWriter(path=None, arch=spec.gguf_name)
        _metadata(writer, hp, spec, vocab, name, PY_QUANTS[quant][1])
        for p in plan:
            raw_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype) if p.qtype not in (Q.F32, Q.F16) else p.shape
            np_dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(p.qtype, np.uint8)
            writer.add_tensor_info(p.name, raw_shape, np.dtype(np_dtype), p.nbytes, raw_dtype=p.qtype)
        with atomic_path(out) as tmp:
            try:
                writer.open_output_file(tmp)
                writer.fout[0].close()  # opened by gguf-py; written instead around the page cache (out_file)
                writer.fout = [OutFile(tmp)]
                writer.write_header_to_file(path=tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for data in track(job.tensors(), total=len(plan), description=f"writing {out.name}",
                                  disable=not progress, transient=True):
                    writer.write_tensor_data(data)
            finally:
                writer.close()
    except OSError as exc:
        raise write_error(out, exc) from None
    finally:
        job.close()
    return GGUFResult(out, quant, len(plan), total)


def write_error(out: Path, exc: OSError) -> UserError:
    """A failed write as a user error; the temporary file is already gone and ``out`` untouched."""
    if isinstance(exc, UserError):  # common.io already said it in one line (WriteError)
        return exc
    what = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    kept = "the existing file is unchanged" if out.exists() else "nothing was written"
    return UserError(f"{out}: write failed ({what}); {kept}")


def plan_vocab_rows(plan: list[Planned]) -> int:
    return next(p.shape[0] for p in plan if p.name == "token_embd.weight")


def check_space(out: Path, needed: int) -> None:
    free = free_bytes(out.parent)
    if free < needed * 1.05 + 16 * 2**20:
        raise UserError(f"{out.parent}: not enough free disk space for {out.name}: need ~{needed / 2**30:.2f} GiB, "
                        f"{free / 2**30:.2f} GiB free")


def quantize_with_llama_cpp(src: Path, out: Path, quant: str, threads: int | None = None) -> None:
    """Quantize an f16/f32 GGUF with llama.cpp's quantizer into ``out`` (atomically)."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--quant {quant} uses llama.cpp's quantizer: pip install 'llm-ft[verify]' "
                        f"(llama-cpp-python), or choose one of {', '.join(PY_QUANTS)}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_CPP_QUANTS[quant])
    params.nthread = threads or max(1, (os.cpu_count() or 2) // 2)
    with atomic_path(out) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise UserError(f"llama.cpp could not quantize {src.name} to {quant} (status {rc})")


def write_gguf(merged: MergedModel, hp: HParams, spec: ArchSpec, vocab: GGUFVocab, out: str | Path, quant: str,
               *, name: str, progress: bool = True, tensors: TensorJob | None = None) -> GGUFResult:
    """Write the GGUF at ``out`` in ``quant`` (Python types directly, K-quants via llama.cpp).

    ``tensors``: ``start_tensors(merged, hp, spec, quant)``, started early so the tensor
    work overlaps the caller's; closed here either way.
    """
    out = Path(out)
    if quant in PY_QUANTS:
        return write_gguf_python(merged, hp, spec, vocab, out, quant, name=name, progress=progress, tensors=tensors)
    inter_quant = python_quant(quant, merged)
    inter = out.with_name(f".{out.name}.{inter_quant}.tmp")
    try:
        if quant not in LLAMA_CPP_QUANTS:
            raise UserError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
        if not llama_cpp_available():
            quantize_with_llama_cpp(out, out, quant)  # raises the UserError that says how to get it
        write_gguf_python(merged, hp, spec, vocab, inter, inter_quant, name=name, progress=progress, tensors=tensors)
        check_space(out, inter.stat().st_size // 2)
        quantize_with_llama_cpp(inter, out, quant)
    finally:
        inter.unlink(missing_ok=True)
        if tensors is not None:
            tensors.close()
    return GGUFResult(out, quant, len(plan_tensors(merged, spec, hp, "f16")), out.stat().st_size)
