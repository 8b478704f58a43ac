"""Merge a PEFT LoRA/DoRA adapter into the original base weights, tensor by tensor.

Framework-free (numpy only). For a linear layer with base weight ``W`` (out, in),
adapter ``A`` (r, in), ``B`` (out, r) and scaling ``s`` (``alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA)::

    LoRA:  W' = W + s * B @ A
    DoRA:  W' = m / ||W + s * B @ A||_row * (W + s * B @ A)   (norm over inputs, per output row; as peft)

Rows are processed in chunks, so the peak extra memory is about one tensor. The adapter
is read, validated and indexed by :mod:`common.peft` (LoRA, rsLoRA, DoRA, lora_bias,
embedding LoRA, Conv1D ``fan_in_fan_out`` layouts and ``modules_to_save`` all merge).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.export.st_io import SafeTensorsModel, TensorInfo, iter_chunks, to_float32
from common.peft import Adapter, ModuleDelta, load_adapter

__all__ = ["Adapter", "MergedModel", "ModuleDelta", "load_adapter", "open_merged"]

# Tensors the base checkpoint may carry that are never weights of the model.
SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
RowSelection = slice | np.ndarray  # rows of a tensor: a range, or row indices (a permutation)


class MergedModel:
    """Base weights with an adapter applied, readable one tensor at a time.

    ``names`` lists the output tensors in base order; :meth:`float32` returns a merged
    tensor as a fresh float32 array; :meth:`info` gives its stored dtype and shape.
    ``config_updates`` are keys to change in ``config.json`` (untying embeddings when
    the adapter changes only one side of a tied pair).
    """

    def __init__(self, base_dir: str | Path, adapter: Adapter | None = None):
        self.base_dir = Path(base_dir)
        self.base = SafeTensorsModel(self.base_dir)
        self.adapter = adapter
        self.hf_config = json.loads((self.base_dir / "config.json").read_text(encoding="utf-8"))
        text_cfg = self.hf_config.get("text_config") or self.hf_config
        if self.hf_config.get("quantization_config") or text_cfg.get("quantization_config"):
            raise UserError(f"{self.base_dir}: base weights are quantized ({self.hf_config.get('quantization_config')}); "
                            "merge needs the original full-precision base model")
        self.names = [n for n in self.base.keys() if not n.endswith(SKIP_SUFFIXES)]
        self.config_updates: dict = {}
        self._extra: dict[str, str] = {}  # new tensor name -> base tensor it copies
        if adapter is not None:
            self._check_adapter()
            self._untie_if_needed()

    # -- consistency ----------------------------------------------------------

    def _check_adapter(self) -> None:
        assert self.adapter is not None
        problems = []
        f = self.adapter.file
        known = set(self.names)
        for weight_name, d in self.adapter.deltas.items():
            if weight_name not in known:
                hint = f" (base has {', '.join(sorted(n for n in known if n.endswith(weight_name.split('.')[-2] + '.weight'))[:2])})"
                problems.append(f"adapter module {d.module!r}: no base tensor {weight_name!r}{hint}")
                continue
            shape = self.base.info(weight_name).shape
            a, b = f.tensors[d.A].shape, f.tensors[d.B].shape  # type: ignore[index]
            if d.embedding:
                ok = len(shape) == 2 and a[1] == shape[0] and b[0] == shape[1]
            else:
                out_f, in_f = (shape[1], shape[0]) if self.adapter.fan_in_fan_out else (shape[0], shape[1])
                ok = len(shape) == 2 and a[1] == in_f and b[0] == out_f and a[0] == b[1]
            if not ok:
                problems.append(f"adapter module {d.module!r}: lora_A {a} / lora_B {b} do not fit base {weight_name} {shape}")
            bias_name = weight_name[: -len(".weight")] + ".bias"
            if d.B_bias is not None and bias_name not in known:
                problems.append(f"adapter module {d.module!r}: has a LoRA bias but the base layer has no {bias_name!r}")
        for target, key in self.adapter.replacements.items():
            base_name = target if target in known else None
            tied_head = target == "lm_head.weight" and self._tied
            if base_name is None and not tied_head:
                problems.append(f"adapter tensor {key!r}: no base tensor {target!r} to replace")
            elif base_name is not None and f.tensors[key].shape != self.base.info(base_name).shape:
                problems.append(f"adapter tensor {key!r}: shape {f.tensors[key].shape} != base {self.base.info(base_name).shape}")
        if problems:
            raise UserError(f"{self.adapter.path}: adapter does not match the base model {self.base_dir}", problems)

    @property
    def _tied(self) -> bool:
        cfg = self.hf_config.get("text_config") or self.hf_config
        tie = cfg.get("tie_word_embeddings", self.hf_config.get("tie_word_embeddings", True))
        return bool(tie) and "lm_head.weight" not in self.base

    def _untie_if_needed(self) -> None:
        """Tied embeddings + an adapter that changes only one side -> write both sides.

        During training peft's embedding LoRA is applied to the input only (lm_head reads
        the shared base weight), and a modules_to_save lm_head replaces the output only.
        The merged model must compute what was trained, so the pair is untied.
        """
        assert self.adapter is not None
        embed = next((n for n in self.names if n.endswith("embed_tokens.weight")), None)
        if not self._tied or embed is None:
            return
        changes_embed = embed in self.adapter.deltas or embed in self.adapter.replacements
        changes_head = "lm_head.weight" in self.adapter.replacements or "lm_head.weight" in self.adapter.deltas
        if changes_embed or changes_head:
            self._extra["lm_head.weight"] = embed
            self.names.append("lm_head.weight")
            self.config_updates["tie_word_embeddings"] = False

    # -- tensors ----------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        return self.base.info(self._extra.get(name, name))

    def is_changed(self, name: str) -> bool:
        a = self.adapter
        return a is not None and (name in a.deltas or name in a.replacements or name in self._extra)

    def float32(self, name: str) -> np.ndarray:
        """The merged tensor ``name`` as a new float32 array."""
        read = self.row_reader(name)
        if read is None:  # DoRA on a Conv1D layout: whole tensor
            a = self.adapter
            assert a is not None
            return self._dora_conv1d(self.base.float32(self._extra.get(name, name)), a.deltas[name])
        shape = self.info(name).shape
        if len(shape) != 2:
            return read(slice(None))
        out = np.empty(shape, dtype=np.float32)
        for i, j in iter_chunks(shape[0], shape[1]):  # peak extra memory: one chunk
            out[i:j] = read(slice(i, j))
        return out

    def row_reader(self, name: str) -> Callable[[RowSelection], np.ndarray] | None:
        """A function giving rows ``sel`` (a slice or row indices) of merged tensor ``name`` as float32.

        Rows of a merge are independent (LoRA adds rows of B@A, DoRA normalises each output
        row), so a tensor can be produced a row chunk at a time, in any order. None for DoRA
        on a Conv1D (fan_in_fan_out) layout, whose norms run down columns: use :meth:`float32`.
        """
        a = self.adapter
        if a is not None and name in a.replacements:
            f, key = a.file, a.replacements[name]
            return lambda sel: to_float32(f.raw(key)[sel], f.tensors[key].dtype)
        src = self._extra.get(name, name)
        raw, dtype = self.base.raw(src), self.base.info(src).dtype
        d = a.deltas.get(name) if a is not None else None
        if d is None:
            bias_delta = self._bias_delta(name)
            if bias_delta is None:
                return lambda sel: to_float32(raw[sel], dtype)
            return lambda sel: to_float32(raw[sel], dtype) + bias_delta[sel]
        assert a is not None and d.A is not None and d.B is not None
        if a.fan_in_fan_out and d.magnitude is not None:
            return None
        A, B = a.file.float32(d.A), a.file.float32(d.B)
        s = np.float32(d.scaling)
        if d.embedding or a.fan_in_fan_out:
            # embedding (vocab, dim) with A (r, vocab), B (dim, r); Conv1D weight (in, out): delta = (B @ A).T
            At, Bt = np.ascontiguousarray(A.T), np.ascontiguousarray(B.T)

            def transposed_rows(sel: RowSelection) -> np.ndarray:
                w = to_float32(raw[sel], dtype)
                t = At[sel] @ Bt
                t *= s
                w += t
                return w

            return transposed_rows
        m = a.file.float32(d.magnitude) if d.magnitude is not None else None
        if m is not None and m.shape != (raw.shape[0],):
            raise UserError(f"{d.module}: DoRA magnitude has shape {m.shape}, expected ({raw.shape[0]},)")

        def lora_rows(sel: RowSelection) -> np.ndarray:
            w = to_float32(raw[sel], dtype)
            t = B[sel] @ A  # (rows, in) part of the update
            t *= s
            w += t
            if m is not None:  # DoRA: each output row of W + sBA rescaled to its learned magnitude (as peft)
                norm = np.linalg.norm(w.astype(np.float64), axis=1).astype(np.float32)
                w *= (m[sel] / norm)[:, None]
            return w

        return lora_rows

    def _bias_delta(self, name: str) -> np.ndarray | None:
        """lora_bias: the base bias gains ``s * lora_B.bias``."""
        a = self.adapter
        if a is None or not name.endswith(".bias"):
            return None
        d = a.deltas.get(name[: -len(".bias")] + ".weight")
        if d is None or d.B_bias is None:
            return None
        return a.file.float32(d.B_bias) * np.float32(d.scaling)

    def _dora_conv1d(self, w: np.ndarray, d: ModuleDelta) -> np.ndarray:
        """DoRA on a Conv1D layout (weight (in, out)): merged on the transposed weight, whole."""
        a = self.adapter
        assert a is not None and d.A is not None and d.B is not None and d.magnitude is not None
        A, B = a.file.float32(d.A), a.file.float32(d.B)
        return self._dora(w.T.copy(), A, B, np.float32(d.scaling), a.file.float32(d.magnitude)).T.copy()

    @staticmethod
    def _dora(w: np.ndarray, A: np.ndarray, B: np.ndarray, s: np.float32, m: np.ndarray) -> np.ndarray:
        """DoRA: rescale each output row of W + sBA to the learned magnitude m (norm per row, as peft)."""
        if m.shape != (w.shape[0],):
            raise UserError(f"DoRA magnitude has shape {m.shape}, expected ({w.shape[0]},)")
        for i, j in iter_chunks(w.shape[0], w.shape[1]):
            rows = w[i:j]
            t = B[i:j] @ A
            t *= s
            rows += t
            norm = np.linalg.norm(rows.astype(np.float64), axis=1).astype(np.float32)
            rows *= (m[i:j] / norm)[:, None]
        return w

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, merged float32 tensor) in output order, one at a time."""
        for name in self.names:
            yield name, self.float32(name)


def open_merged(base_dir: str | Path, adapter: str | Path | Adapter | None) -> MergedModel:
    """The base model at ``base_dir`` with ``adapter`` (a loaded one, a directory, or none) applied."""
    if adapter is not None and not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    return MergedModel(base_dir, adapter)
