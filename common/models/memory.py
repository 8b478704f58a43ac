"""Memory preflight: will LoRA training of this model fit, before any weight is loaded?

``estimate_training_memory`` adds up, from config.json alone:

- weights: every parameter at the compute dtype, or linear layers at ~4.1-4.5 bits with a
  4-bit base (bitsandbytes nf4 keeps embeddings and norms at the compute dtype; MLX
  quantizes embeddings too);
- LoRA: r*(in+out) per adapted matrix, each in fp32 with its gradient and two Adam
  moments (16 bytes per parameter);
- activations saved for the backward pass, per adapted layer and token, at the compute
  dtype (with gradient checkpointing: each layer's input, plus one layer recomputed); fewer
  where the backend recomputes the MLP's activation product and the normalised layer inputs
  (``DevicePlan.lean_layers``, when the run allows it: ``lean_allowed``);
- logits: batch*seq*vocab fp32 values, or one chunk of positions where the backend's loss is
  chunked (``DevicePlan.loss_chunk_values``), times 4: the logits and their log-softmax from
  the forward pass, and the gradients of both in the backward pass;
- allocator slack on activations and logits: on Linux CPU, glibc keeps the heap pages of
  freed temporaries, which nearly doubles the resident peak (measured: x1.9; with
  ``MALLOC_MMAP_THRESHOLD_=65536`` the peak matches the saved tensors to within 5%);
- overhead: the framework itself (CUDA context, torch/MLX runtime), measured.

Measured on SmolLM2-135M (fp32, CPU, LoRA r=16 on all 7 projections, 2-3 steps, the torch
backend's chunked loss and recompute): batch 4 x seq 256 peaks at 3010 MiB RSS without
checkpointing (estimate 3395 MiB) and 2350 MiB with it (estimate 2144 MiB); see
tests/test_models_memory.py. On an H100 (Llama-3.1-8B shape, bf16 LoRA
r16 on all 7 projections, one 4096-token row, torch backend; ``python -m bench.preflight_check``)
the estimate (less its CUDA-context overhead) is 1.11x the measured peak in the default mode, 1.02x
with offload; with a 4-bit base 1.16-1.17x and 1.00-1.03x.
``preflight`` compares the estimate with ``available_memory`` and, when it does not fit,
raises a UserError listing changes that would, each with its new estimate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.archs import ARCHS, ArchSpec, by_model_type
from common.backends import DevicePlan
from common.errors import UserError
from common.models.ranks import RankLayout
from common.models.ranks import apply as per_rank

GiB = 1 << 30
MiB = 1 << 20
_PLAIN = ARCHS["llama"]  # the layout assumed for a model type the table lacks
LORA_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + Adam m and v
LOGIT_COPIES = 4  # logits and log-softmax (forward), their gradients (backward): fp32, alive together


@dataclass
class Estimate:
    total_bytes: int
    parts: dict[str, int]

    def describe(self) -> str:
        """'3.2 GiB (weights 1.1 GiB, lora 20 MiB, ...)'."""
        inner = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items())
        return f"{format_bytes(self.total_bytes)} ({inner})"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class Shape:
    """The dimensions that matter for memory, read from a config.json."""
    vocab: int
    hidden: int
    inter: int
    layers: int
    head_dim: int
    q_dim: int
    kv_dim: int
    tied: bool
    model_type: str
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Shape:
        cfg = cfg.get("text_config", cfg)  # multimodal configs keep the language model inside
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            return cls(vocab=int(cfg["vocab_size"]), hidden=hidden, inter=int(cfg.get("intermediate_size") or 4 * hidden),
                       layers=int(cfg["num_hidden_layers"]), head_dim=head_dim, q_dim=heads * head_dim,
                       kv_dim=int(cfg.get("num_key_value_heads") or heads) * head_dim,
                       tied=bool(cfg.get("tie_word_embeddings", False)), model_type=str(cfg.get("model_type", "")),
                       attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"config.json: cannot estimate memory: missing or invalid {exc}") from None

    @property
    def arch(self) -> ArchSpec:
        """The table's row for this model type; an unknown type counts as a plain llama layout."""
        return by_model_type(self.model_type) or _PLAIN

    @property
    def fused(self) -> bool:  # phi3: qkv_proj and gate_up_proj
        return self.arch.fused

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear modules: name -> (in_features, out_features)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.inter
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def parameter_count(self) -> int:
        """Parameters of the whole model, from its shape (matches the safetensors of supported families)."""
        norms = 4 if self.arch.sandwich_norms else 2  # Gemma: pre and post norms
        per_layer = sum(a * b for a, b in self.linears().values()) + norms * self.hidden
        if self.arch.qk_norm:
            per_layer += 2 * self.head_dim  # q_norm and k_norm
        if self.arch.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim  # q/k/v biases
        elif self.attention_bias:
            per_layer += 2 * self.q_dim + 2 * self.kv_dim if not self.fused else 0
        if self.mlp_bias:
            per_layer += 2 * self.inter + self.hidden
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * per_layer + self.hidden


def _targets(shape: Shape, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    linears = shape.linears()
    if "all-linear" in targets:
        return linears
    chosen = {name: dims for name, dims in linears.items() if name in targets}
    if shape.fused:  # a q/k/v or gate/up target adapts the fused matrix
        if {"q_proj", "k_proj", "v_proj"} & set(targets):
            chosen["qkv_proj"] = linears["qkv_proj"]
        if {"gate_proj", "up_proj"} & set(targets):
            chosen["gate_up_proj"] = linears["gate_up_proj"]
    return chosen


def estimate_training_memory(model_config: dict[str, Any], *, plan: DevicePlan, load_in_4bit: bool,
                             lora_r: int, targets: Sequence[str], batch_size: int, seq_len: int,
                             grad_checkpoint: bool, num_layers: int | None = None, offload: bool = False,
                             ranks: RankLayout | None = None, lean: bool = True) -> Estimate:
    """Peak memory of LoRA training on ``plan`` (common.backends), in bytes, by part (see the module docstring);
    with ``ranks``, of one process of that data-parallel job (common.models.ranks); ``lean`` False where the
    run rules out the plan's recompute of layer intermediates (``lean_allowed``)."""
    dtype_bytes = plan.dtype_bytes
    s = Shape.from_config(model_config)
    linears = s.linears()
    linear_params = s.layers * sum(a * b for a, b in linears.values())
    other_params = s.parameter_count() - linear_params
    prequant = model_config.get("quantization") or {}  # an MLX-quantized checkpoint (mlx-community/...-4bit)
    if prequant.get("bits"):
        per = prequant["bits"] / 8 + 4 / int(prequant.get("group_size", 64))  # + fp16 scale and bias per group
        embed = s.vocab * s.hidden * (1 if s.tied else 2)
        weights = (linear_params + embed) * per + (other_params - embed) * dtype_bytes
        root = embed * per + s.hidden * dtype_bytes
    elif load_in_4bit:
        embed = s.vocab * s.hidden * (1 if s.tied else 2) if plan.quantizes_embeddings else 0
        weights = (linear_params + embed) * plan.quant_bytes + (other_params - embed) * dtype_bytes
        root = embed * plan.quant_bytes + (s.vocab * s.hidden * (1 if s.tied else 2) - embed + s.hidden) * dtype_bytes
    else:
        weights = (linear_params + other_params) * dtype_bytes
        root = (s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden) * dtype_bytes

    adapted = min(num_layers or s.layers, s.layers)
    chosen = _targets(s, targets)
    lora_params = adapted * lora_r * sum(a + b for a, b in chosen.values())
    lora = lora_params * LORA_BYTES_PER_PARAM

    tokens = batch_size * seq_len
    # Values autograd keeps per token in one layer: 2 norm inputs, 2 normed inputs to the
    # projections, q/k/v and the attention output (memory-efficient attention: no seq^2 term),
    # the o_proj input, and the MLP's gate, up, activation and product; plus LoRA's r per matrix.
    per_token = 4 * s.hidden + 3 * s.q_dim + 2 * s.kv_dim + 4 * s.inter + lora_r * len(chosen)
    if lean and plan.lean_layers:  # act(gate) and act(gate)*up; without checkpointing, both normalised inputs too
        per_token -= 2 * s.inter + (0 if grad_checkpoint or offload else 2 * s.hidden)
    layer_bytes = tokens * per_token * dtype_bytes
    if offload:  # layer inputs in host memory: one layer recomputed, one input in transit (torch_ft.offload)
        activations = tokens * s.hidden * dtype_bytes + layer_bytes
    elif grad_checkpoint:
        activations = adapted * tokens * s.hidden * dtype_bytes + layer_bytes
    else:
        activations = adapted * layer_bytes
    positions = tokens
    if plan.loss_chunk_values:  # chunks of at least 128 positions (torch_ft.loss)
        positions = min(tokens, max(128, plan.loss_chunk_values // s.vocab))
    logits = positions * s.vocab * 4 * LOGIT_COPIES
    parts = {"weights": int(weights), "lora+adam": int(lora), "activations": int(activations * plan.slack),
             "logits": int(logits * plan.slack), "overhead": plan.overhead_bytes}
    parts = per_rank(parts, weights_root=int(root), layers=s.layers, layout=ranks)
    return Estimate(sum(parts.values()), parts)


# ---------------------------------------------------------------------------
# what is available


def _sysctl_memsize() -> int | None:
    try:
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _ram_available() -> tuple[int, str]:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()[1:]}
        if "MemAvailable" in info:
            return info["MemAvailable"], f"RAM available {format_bytes(info['MemAvailable'])} " \
                                         f"of {format_bytes(info.get('MemTotal', 0))} (/proc/meminfo)"
    except (OSError, ValueError, IndexError):
        pass
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return total, f"RAM {format_bytes(total)} (total; free memory unknown)"
    except (ValueError, OSError, AttributeError):
        return 0, "memory size unknown"


def available_memory(plan: DevicePlan) -> tuple[int, str]:
    """(bytes available for training, description) on ``plan``'s device."""
    if plan.device_memory is not None:  # a discrete GPU, measured by its framework
        return plan.device_memory
    if plan.unified_memory and sys.platform == "darwin":
        total = _sysctl_memsize()
        if total:
            usable = int(total * 0.75)  # Metal's recommended working set is about 3/4 of unified memory
            return usable, f"unified memory {format_bytes(total)} (about 75% usable by the GPU: {format_bytes(usable)})"
    return _ram_available()


# ---------------------------------------------------------------------------
# preflight


def lean_allowed(cfg: Any) -> bool:
    """Whether a run's options let a backend recompute layer intermediates (``DevicePlan.lean_layers``):
    not with LoRA dropout or DoRA (the MLP's down projection then keeps its own input), FSDP (it frees
    the weights the recompute reads) or torch.compile (it fuses the layers its own way)."""
    return not (getattr(cfg, "lora_dropout", 0) or getattr(cfg, "use_dora", False) or getattr(cfg, "fsdp", False)
                or getattr(cfg, "compile", "off") != "off")


def _suggestions(model_config: dict[str, Any], kw: dict[str, Any], limit: int) -> list[str]:
    """Single changes (then pairs) that bring the estimate under ``limit``, each with its estimate."""
    s = Shape.from_config(model_config)
    changes: list[tuple[str, dict[str, Any]]] = []
    if not kw["load_in_4bit"] and kw["plan"].can_quantize:
        changes.append(("a 4-bit base (--load-in-4bit)", {"load_in_4bit": True}))
    if not kw["grad_checkpoint"]:
        changes.append(("gradient checkpointing (--grad-checkpoint)", {"grad_checkpoint": True}))
    ranks = kw.get("ranks")
    if ranks is not None and ranks.processes > 1 and not ranks.fsdp and kw["plan"].backend == "torch":
        changes.append(("the base sharded over the processes (--fsdp)",
                        {"ranks": RankLayout(ranks.processes, True, ranks.local)}))
    b = kw["batch_size"]
    while b > 1:
        b //= 2
        changes.append((f"--batch-size {b}" + f" --grad-accum {kw['batch_size'] // b}", {"batch_size": b}))
    seq = kw["seq_len"]
    while seq > 128:
        seq //= 2
        changes.append((f"--max-seq-length {seq}", {"seq_len": seq}))
    layers = kw.get("num_layers") or s.layers
    while layers > 2:
        layers //= 2
        changes.append((f"--num-layers {layers} (adapt only the last {layers} layers)", {"num_layers": layers}))

    def fits(change: dict[str, Any]) -> Estimate | None:
        est = estimate_training_memory(model_config, **{**kw, **change})
        return est if est.total_bytes <= limit else None

    found: list[str] = []
    seen_kinds: set[str] = set()
    for label, change in changes:  # the mildest change of each kind that fits on its own
        kind = next(iter(change))
        if kind not in seen_kinds and fits(change) is not None:
            seen_kinds.add(kind)
            found.append(f"{label}: {format_bytes(fits(change).total_bytes)}")
    seen_pairs: set[tuple[str, str]] = set()
    for i, (label_a, a) in enumerate(changes):  # then the mildest pair of each two kinds
        for label_b, b2 in changes[i + 1:]:
            kinds = (next(iter(a)), next(iter(b2)))
            if len(found) >= 3 or kinds[0] == kinds[1] or kinds in seen_pairs or set(kinds) <= seen_kinds:
                continue
            est = fits({**a, **b2})
            if est is not None:
                seen_pairs.add(kinds)
                found.append(f"{label_a} and {label_b}: {format_bytes(est.total_bytes)}")
    return found[:3]


@dataclass
class Assessment:
    estimate: Estimate
    available: int  # bytes, 0 when unknown
    where: str  # what ``available`` measured
    limit: int  # the part of ``available`` the estimate may use
    suggestions: list[str]  # changes that would fit, each with its estimate (empty when it fits)

    @property
    def fits(self) -> bool:
        return self.available <= 0 or self.estimate.total_bytes <= self.limit


def assess(model_config: dict[str, Any], *, plan: DevicePlan, load_in_4bit: bool, lora_r: int,
           targets: Sequence[str], batch_size: int, seq_len: int,
           grad_checkpoint: bool, num_layers: int | None = None, limit_bytes: int | None = None,
           headroom: float = 0.9, ranks: RankLayout | None = None, lean: bool = True) -> Assessment:
    """The estimate, what is available, and (when it does not fit) what would; raises nothing.
    With ``ranks``: for one process of a data-parallel job, against its share of the memory."""
    kw = dict(plan=plan, load_in_4bit=load_in_4bit, lora_r=lora_r, targets=list(targets), batch_size=batch_size,
              seq_len=seq_len, grad_checkpoint=grad_checkpoint, num_layers=num_layers, ranks=ranks, lean=lean)
    est = estimate_training_memory(model_config, **kw)
    if limit_bytes is None:
        available, where = available_memory(plan)
    else:
        available, where = limit_bytes, f"limit {format_bytes(limit_bytes)}"
    if ranks is not None and (k := ranks.sharing(plan)) > 1:
        available //= k
        where += f"; shared by {k} processes: {format_bytes(available)} each"
    limit = int(available * headroom)
    result = Assessment(est, available, where, limit, [])
    if not result.fits:
        result.suggestions = _suggestions(model_config, kw, limit)
    return result


def preflight(model_config: dict[str, Any], *, plan: DevicePlan, load_in_4bit: bool, lora_r: int,
              targets: Sequence[str], batch_size: int, seq_len: int,
              grad_checkpoint: bool, num_layers: int | None = None, limit_bytes: int | None = None,
              headroom: float = 0.9, ranks: RankLayout | None = None, lean: bool = True) -> Estimate:
    """Estimate training memory; raise UserError, listing what would fit, if it exceeds what is available.

    Call it before loading any weight. ``plan`` is the backend's device plan
    (common.backends.device_plan: device, dtype, overheads); ``seq_len`` the
    longest padded row (or --max-seq-length when packing). ``limit_bytes`` replaces the measured
    availability (tests, or a user's cap); ``headroom`` is the fraction of it the estimate may use.
    An unknown availability never blocks. Returns the estimate when it fits.
    """
    a = assess(model_config, plan=plan, load_in_4bit=load_in_4bit,
               lora_r=lora_r, targets=targets, batch_size=batch_size, seq_len=seq_len,
               grad_checkpoint=grad_checkpoint, num_layers=num_layers, limit_bytes=limit_bytes, headroom=headroom,
               ranks=ranks, lean=lean)
    if a.fits:
        return a.estimate
    problems = [f"estimate: {a.estimate.describe()}",
                f"available: {a.where}; the estimate may use {int(headroom * 100)}% of it"]
    problems += [f"would fit: {f}" for f in a.suggestions] or ["no single or paired change fits: choose a smaller model"]
    raise UserError(f"training would need about {format_bytes(a.estimate.total_bytes)} but only "
                    f"{format_bytes(a.limit)} is available", problems)


# ---------------------------------------------------------------------------
# memory modes under a budget (--max-memory)

MODES = ("default", "checkpoint", "offload")  # fastest first
MODE_FLAGS = {"default": {"grad_checkpoint": False}, "checkpoint": {"grad_checkpoint": True},
              "offload": {"grad_checkpoint": True, "offload": True}}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str, name: str = "max_memory") -> int:
    """Bytes of "16GB" (10^9, as accelerate's max_memory reads it), "16GiB" (2^30), "12000MB"; ValueError naming ``name``."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{name}: expected a size such as 16GB, 16GiB or 12000MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def usable_modes(plan: DevicePlan) -> tuple[str, ...]:
    """Offload moves layer inputs from a GPU to host memory: only for torch on CUDA (elsewhere it saves nothing)."""
    if plan.backend == "torch" and plan.device.startswith("cuda"):
        return MODES
    return MODES[:2]


def mode_table(model_config: dict[str, Any], **kw: Any) -> list[tuple[str, Estimate]]:
    """The estimate of each mode usable on ``kw["plan"]``, fastest first (``kw``: estimate_training_memory's)."""
    kw = {k: v for k, v in kw.items() if k not in ("grad_checkpoint", "offload")}
    return [(mode, estimate_training_memory(model_config, **kw, **MODE_FLAGS[mode])) for mode in usable_modes(kw["plan"])]


def budget_limit(budget: int, plan: DevicePlan, headroom: float = 0.9) -> tuple[int, str]:
    """What a --max-memory budget lets the estimate use: the budget, or less where the device has less."""
    available, where = available_memory(plan)
    if available and int(available * headroom) < budget:
        return int(available * headroom), f"--max-memory {format_bytes(budget)}, but {where}"
    return budget, f"--max-memory {format_bytes(budget)}"


def choose_mode(model_config: dict[str, Any], *, budget: int, requested: str = "auto", **kw: Any) -> tuple[str, str]:
    """The fastest memory mode whose estimate fits ``budget`` bytes, and one line saying which and why.

    ``requested`` other than "auto" is checked, not changed. When no mode fits, raises UserError
    listing the changes (smaller micro-batch, 4-bit base...) that fit in the leanest mode.
    """
    limit, where = budget_limit(budget, kw["plan"])
    table = mode_table(model_config, **kw)
    if requested != "auto":
        table = [(m, e) for m, e in table if m == requested] or table[-1:]
    for mode, est in table:
        if est.total_bytes <= limit:
            slower = [f"{m} needs {format_bytes(e.total_bytes)}" for m, e in table if MODES.index(m) < MODES.index(mode)]
            why = f"; {', '.join(slower)}" if slower else " (the fastest)"
            return mode, (f"memory mode {mode}: about {format_bytes(est.total_bytes)} fits {where}{why}")
    leanest, est = table[-1]
    fixes = _suggestions(model_config, {**kw, **MODE_FLAGS[leanest]}, limit)
    problems = [f"{m}: {e.describe()}" for m, e in table]
    problems += [f"would fit with --memory-mode {leanest} and {f}" for f in fixes] or \
        ["no single or paired change fits: choose a smaller model"]
    raise UserError(f"training would need about {format_bytes(est.total_bytes)} even in memory mode {leanest}, "
                    f"but {where} allows {format_bytes(limit)}", problems)
