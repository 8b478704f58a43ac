"""A LoRA adapter as a GGUF, for Ollama's ``ADAPTER`` and llama.cpp's ``--lora``.

Layout as llama.cpp's ``convert_lora_to_gguf.py`` writes it: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and for each adapted weight
``<gguf name>.lora_a`` (r, in) and ``<gguf name>.lora_b`` (out, r). llama.cpp scales the
update by ``alpha / r`` with r read from lora_b, so rsLoRA's ``alpha / sqrt(r)`` is
written as ``alpha * sqrt(r)``. Architecture transforms that act on rows (llama's Q/K
permutation) act on ``lora_b``, since the rows of ``B @ A`` are the rows of ``B``.

DoRA, embedding LoRA, LoRA biases and modules_to_save cannot be expressed this way:
they are refused with a pointer to the merged export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from common.errors import UserError
from common.export.arch import ArchSpec, HParams, permute_rows
from common.export.gguf_file import write_error
from common.io import atomic_path
from common.peft import Adapter


@dataclass
class LoraPlan:
    name: str  # GGUF tensor name
    source: str  # adapter tensor name
    shape: tuple[int, ...]
    base_name: str  # HF base tensor name (for transforms)
    is_b: bool
    extra_scale: float  # folded into lora_b when modules do not share one alpha/r


def _refuse_unsupported(adapter: Adapter) -> None:
    adapter.refuse(("dora", "modules_to_save", "embedding", "bias", "fan_in_fan_out"), "a GGUF LoRA adapter",
                   " (llama.cpp adapters hold lora_a/lora_b of linear layers only); export the merged model "
                   "instead (drop --adapter-only)")


def alpha_for_gguf(adapter: Adapter) -> tuple[float, dict[str, float]]:
    """One ``adapter.lora.alpha`` for the file, plus per-module factors folded into lora_b.

    llama.cpp computes scale = alpha / r per tensor; when every module has the same
    scaling s at its own rank, alpha = s * r works only if the ranks agree too. Otherwise
    alpha is written as 0 (llama.cpp then applies no alpha/r) and each lora_b carries s.
    """
    ranks = {d.rank for d in adapter.deltas.values()}
    scalings = {round(d.scaling, 12) for d in adapter.deltas.values()}
    if len(ranks) == 1 and len(scalings) == 1:
        (r,), (s,) = ranks, scalings
        return s * r, {}
    return 0.0, {w: d.scaling for w, d in adapter.deltas.items()}


def write_lora_gguf(adapter: Adapter, hp: HParams, spec: ArchSpec, out: str | Path, *, name: str,
                    progress: bool = True) -> Path:
    """Write ``adapter`` as a GGUF LoRA adapter for the base architecture ``spec`` at ``out``."""
    from rich.progress import track

    _refuse_unsupported(adapter)
    out = Path(out)
    tmap = spec.tensor_map(hp.n_layers)
    alpha, folded = alpha_for_gguf(adapter)
    plan: list[LoraPlan] = []
    problems = []
    for weight, d in sorted(adapter.deltas.items()):
        gname = tmap.get_name(weight, try_suffixes=(".weight", ".bias"))
        if gname is None or (weight == "lm_head.weight" and spec.always_tied):
            problems.append(f"adapted tensor {weight!r} has no llama.cpp name for {spec.gguf_name}")
            continue
        assert d.A is not None and d.B is not None
        s = folded.get(weight, 1.0)
        plan.append(LoraPlan(f"{gname}.lora_a", d.A, adapter.file.tensors[d.A].shape, weight, False, 1.0))
        plan.append(LoraPlan(f"{gname}.lora_b", d.B, adapter.file.tensors[d.B].shape, weight, True, s))
    if problems:
        raise UserError(f"{adapter.path}: adapter tensors llama.cpp would not know", problems)
    w = gguf.GGUFWriter(path=None, arch=spec.gguf_name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for p in plan:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), int(np.prod(p.shape)) * 4, raw_dtype=gguf.GGMLQuantizationType.F32)
    try:
        with atomic_path(out) as tmp:
            try:
                w.write_header_to_file(path=tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                for p in track(plan, description=f"writing {out.name}", disable=not progress, transient=True):
                    data = adapter.file.float32(p.source)
                    if p.is_b:
                        data = _transform_b(p.base_name, data, spec, hp) * np.float32(p.extra_scale)
                    w.write_tensor_data(np.ascontiguousarray(data, dtype=np.float32))
            finally:
                w.close()
    except OSError as exc:
        raise write_error(out, exc) from None
    return out


def _transform_b(base_name: str, b: np.ndarray, spec: ArchSpec, hp: HParams) -> np.ndarray:
    """Row transforms of the base weight, applied to lora_b (rows of B@A = rows of B)."""
    if spec.permute_qk and base_name.endswith("q_proj.weight"):
        return permute_rows(b, hp.n_head)
    if spec.permute_qk and base_name.endswith("k_proj.weight"):
        return permute_rows(b, hp.n_head_kv)
    return b


def scaling_note(adapter: Adapter) -> str:
    """How the adapter's scaling is represented, for the export summary."""
    alpha, folded = alpha_for_gguf(adapter)
    if folded:
        return "per-module scaling folded into lora_b (adapter.lora.alpha = 0)"
    r = next(iter(adapter.deltas.values())).rank
    kind = "rsLoRA alpha/sqrt(r)" if adapter.use_rslora else "alpha/r"
    return f"scale {kind} = {alpha / r:g}, written as adapter.lora.alpha = {alpha:g} with r = {r}"
