"""The MLX backend: mlx-lm models with LoRA/DoRA on Apple Metal, the CPU, or CUDA.

Implements :class:`common.train.backend.Backend`; the shared loop owns data order,
schedule, evaluation and checkpoints. The training step is compiled (``mx.compile``):
one function computes loss and gradients of a micro-batch (loss at the supervised positions
only, :mod:`mlx_ft.loss`), another clips, applies AdamW and keeps the old values when the
gradient norm is not finite. Only the loss is read back after the forward pass; the
backward pass, the clipping and the update of a step are evaluated together as one graph
(gradients of several micro-batches are summed in between). On the CPU a micro-batch runs
in parts, one MLX stream per core (:mod:`mlx_ft.lanes`).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_reduce
from mlx_lm.utils import get_total_parameters

from common.errors import UserError
from common.io import atomic_path, write_json
from common.options import TrainConfig, memory_mode
from common.train.backend import BackendInfo, Batch, StepStats
from common.train.world import World
from mlx_ft import lanes, lora, peft_format, preference
from mlx_ft import loss as mlxloss
from mlx_ft import model as mlxm

OPTIMIZER_FILE = "mlx_optimizer.safetensors"
RNG_FILE = "mlx_rng.json"
BETAS = (0.9, 0.999)  # torch's AdamW defaults, which the torch backend uses
EPS = 1e-8
GPU_SHAPE_MULTIPLE = 32  # on a GPU, row width and target count are padded to multiples of this (as mlx-lm pads)
# ... and the target count to this many significant bits (<= 12.5% filler rows at the output head): a
# length-grouped step's count of targets is new in nearly every batch, and each new count was a new trace.
GPU_TARGET_BITS = 4


class AdamW(optim.AdamW):
    """AdamW as torch computes it (bias correction on), decaying only matrices.

    The torch backend puts 1-D parameters (DoRA magnitudes) in a no-decay group.
    """

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if parameter.ndim < 2:
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)


def _mix(seed: int, n: int) -> int:
    """A 64-bit key for micro-batch ``n`` of a run (splitmix64), so RNG state is just (seed, n)."""
    z = (seed * 0x9E3779B97F4A7C15 + (n + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return z ^ (z >> 31)


def _keep_where(ok: mx.array, new: dict | list, old: dict | list) -> None:
    """In place: each array leaf of ``new`` becomes ``where(ok, new, old)`` (a nested dict/list tree)."""
    keys = new.keys() if isinstance(new, dict) else range(len(new))
    for k in keys:
        if isinstance(new[k], (dict, list)):
            _keep_where(ok, new[k], old[k])
        elif isinstance(new[k], mx.array):
            new[k] = mx.where(ok, new[k], old[k])


class MLXBackend:
    name = "mlx"

    def __init__(self, compile: bool = True) -> None:
        self.compile = compile  # mx.compile the step functions (tests compare both ways)
        self.model: nn.Module | None = None
        self.received: dict[str, mx.array] | None = None  # the last batch's arrays (tests read them)
        self.world = World()
        self.group = None  # mx.distributed's group under mlx.launch

    # -- data parallelism (mlx.launch) ---------------------------------------------------

    def init_world(self, world: World, cfg: TrainConfig) -> World:
        """Join the ranks mlx.launch started (ring over TCP by default; jaccl over Thunderbolt where offered)."""
        try:
            self.group = mx.distributed.init(strict=True)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"rank {world.rank}: cannot join the mlx.launch job: {exc}") from None
        self.world = World(self.group.rank(), self.group.size(), 0, world.launcher)
        return self.world

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.world.distributed:
            return list(values)
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group, stream=mx.cpu)
        return [float(v) for v in out.tolist()]

    def close_world(self) -> None:
        pass  # mx.distributed has no teardown: the group ends with the process

    # -- setup -------------------------------------------------------------------

    def setup(self, model_dir: Path, cfg: TrainConfig, pad_id: int) -> BackendInfo:
        notes: list[str] = []
        mlxm.select_device(cfg.device)
        self.pad_id = pad_id
        self.seed = int(cfg.seed)
        self.draws = 0  # micro-batches run so far: the dropout RNG position
        self.dropout = float(cfg.lora_dropout)
        self.use_rslora = bool(cfg.use_rslora)
        model, _ = mlxm.load_base(Path(model_dir), trust_remote_code=cfg.trust_remote_code)
        self.dtype = mlxm.resolve_dtype(cfg.dtype)
        mlxm.cast_floats(model, self.dtype)
        bits = 4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else None
        if bits and mlxm.is_quantized(model):
            notes.append(f"--load-in-{bits}bit: the base is already quantised; kept as it is")
        elif bits:
            n = mlxm.quantize(model, bits)
            notes.append(f"base quantised to {bits}-bit (MLX affine, group {mlxm.QUANT_GROUP}): {n} layers")
        mx.random.seed(self.seed)  # the adapter's initial values come from this seed
        paths, missing = lora.attach(model, lora.LoraSpec.from_config(cfg))
        if missing:
            notes.append(f"targets not in this architecture (skipped): {', '.join(missing)}")
        if memory_mode(cfg) != "default":  # checkpoint (offload is refused on MLX)
            mlxm.checkpoint_blocks(model)
        if cfg.optim != "adamw":
            notes.append(f"--optim {cfg.optim}: 8-bit optimizers are CUDA/bitsandbytes only; using adamw on MLX "
                         "(a LoRA's optimizer state is small)")  # the loop prints every note
        self.weight_decay = float(cfg.weight_decay)
        self.model = model
        self.rope = mlxm.uses_rope(model)
        self.head = mlxloss.output_head(model)  # None: the loss gathers rows of the full logits
        # Shapes rounded up for mx.compile: on a GPU a new shape costs new kernels (~0.5 s), and
        # packed rows (nearly full anyway) all get the packing length. On the CPU, padding would
        # cost more than a new trace.
        gpu = mx.default_device().type == mx.gpu
        self.shape_multiple = GPU_SHAPE_MULTIPLE if gpu else 1
        self.target_bits = GPU_TARGET_BITS if gpu else None
        # On the CPU a micro-batch runs in parts on one stream per core (mlx_ft.lanes): MLX's bundled BLAS
        # uses one thread, a stream runs its work in order, and each stream has a thread of its own.
        self.set_lanes(lanes.default_lanes(not gpu))
        self.packed_width = int(cfg.max_seq_length) if gpu and cfg.packing else 1
        self._new_optimizer()
        mx.eval(model.parameters())
        mx.reset_peak_memory()
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        # mlx-lm's count unpacks 4/8-bit weights but skips the LoRA layers' own arrays
        total = get_total_parameters(model) + trainable
        notes.insert(0, f"mlx {mx.__version__} on {mlxm.device_name()}, compiled step: {self.compile}"
                     + (f", micro-batches in {self.lanes} parts on {self.lanes} CPU streams" if self.lanes > 1 else ""))
        leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
        return BackendInfo(device=mlxm.device_name(), dtype=str(self.dtype).split(".")[-1], trainable_params=trainable,
                           total_params=total, target_modules=leaves, notes=notes)

    def set_lanes(self, n: int) -> None:
        """Run each micro-batch in ``n`` parts, each on a CPU stream of its own (1: whole, on the default stream)."""
        self.lanes = n
        self._streams = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else []

    def _new_optimizer(self) -> None:
        self.optimizer = AdamW(learning_rate=0.0, betas=list(BETAS), eps=EPS, weight_decay=self.weight_decay,
                               bias_correction=True)
        self.optimizer.init(self.model.trainable_parameters())
        self._grads = None  # the step's summed gradients (lazy until the step or the next micro-batch)
        self._nonfinite = False
        self._build_steps()

    def _build_steps(self) -> None:
        """(Re)create the compiled functions; needed whenever the state trees they capture change."""
        model, opt, head = self.model, self.optimizer, self.head

        def scaled_loss(model, inputs, segments, picks, targets, weights, scale):
            total = mlxloss.loss_sum(model, head, inputs, segments, picks, targets, weights)
            return total * scale, total

        loss_and_grad = nn.value_and_grad(model, scaled_loss)

        def forward_backward(inputs, segments, picks, targets, weights, scale):
            (_, total), grads = loss_and_grad(model, inputs, segments, picks, targets, weights, scale)
            return total, grads

        def update(grads, max_norm):
            """Clip to ``max_norm``, step; a non-finite norm leaves parameters and optimizer state as they were."""
            norm = mx.sqrt(tree_reduce(lambda acc, g: acc + g.astype(mx.float32).square().sum(), grads,
                                       mx.array(0.0)))
            ok = mx.isfinite(norm)
            coef = mx.minimum(max_norm / (norm + 1e-6), 1.0)  # torch's clip_grad_norm_ coefficient
            params = model.trainable_parameters()
            state = tree_map(lambda v: v, opt.state)  # the same arrays; update() replaces the state's leaves
            opt.update(model, tree_map(lambda g: g * coef, grads))
            model.update(tree_map(lambda new, old: mx.where(ok, new, old), model.trainable_parameters(), params))
            _keep_where(ok, opt.state, state)
            return norm

        if self.compile:
            state = [model.state, mx.random.state]
            forward_backward = mx.compile(forward_backward, inputs=state, outputs=state)
            update = mx.compile(update, inputs=[model.state, opt.state], outputs=[model.state, opt.state])
        self._fb = forward_backward
        self._update = update

    # -- batches -----------------------------------------------------------------

    def _views(self, batch: Batch) -> mlxloss.LossViews:
        packed = mlxm.is_packed(batch)
        if packed:
            if not self.rope:
                raise UserError("--packing on MLX needs a model with rotary position embeddings "
                                "(mlx-lm models take no position ids)")
            mlxm.check_positions(batch)
        width = self.packed_width if packed else self.shape_multiple
        return mlxloss.views(batch, self.pad_id, packed, width, self.shape_multiple, self.target_bits)

    def _mode(self, training: bool) -> None:
        if self.model.training != training:  # train()/eval() walk every module: only on a change
            self.model.train(training)

    # -- training ----------------------------------------------------------------

    def _parts(self, batch: Batch) -> list[tuple[Batch, Any]]:
        """The batch's parts, each with the stream (a context) it runs on; with one lane (GPUs, macOS) the
        whole batch on the default stream."""
        self.received = mlxm.batch_arrays(batch)
        if not self._streams:
            return [(batch, nullcontext())]
        parts = lanes.split(batch, self.lanes, self.pad_id)
        return [(part, mx.stream(stream)) for part, stream in zip(parts, self._streams, strict=False)]

    def forward_backward(self, batch: Batch, scale: float) -> float:
        """Runs the forward pass now (the loss is returned); the backward pass stays lazy until
        ``optimizer_step`` or the next micro-batch, so a step of one micro-batch is one graph.
        On the CPU the batch's parts (lanes) run side by side and their gradients add up."""
        self._mode(True)
        parts = self._parts(batch)
        if self._grads is not None:
            mx.eval(self._grads)  # finish the previous micro-batch first: one batch's activations at a time
        mx.random.seed(_mix(self.seed, self.draws))  # dropout masks depend on (seed, micro-batch) only
        self.draws += 1
        scale_arr = mx.array(scale, dtype=mx.float32)
        totals, grads = [], None
        for part, stream in parts:
            v = self._views(part)
            with stream:
                total, g = self._fb(v.inputs, v.segments, v.picks, v.targets, v.weights, scale_arr)
            totals.append(total)
            grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(totals)  # every part's forward pass at once
        value = sum(float(t) for t in totals)
        if not math.isfinite(value):
            self._nonfinite = True  # its gradients are NaN too; the step will be skipped
            return value
        self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
        return value

    def optimizer_step(self, lr: float, max_grad_norm: float, skip: bool = False) -> StepStats:
        grads, self._grads = self._grads, None
        # Under data parallelism the loop decides from the summed loss, identical on every rank.
        loss_finite, self._nonfinite = not self._nonfinite or self.world.distributed, False
        if skip or not loss_finite or grads is None:
            return StepStats(grad_norm=float("nan"), finite=loss_finite, skipped=True)
        if self.world.distributed:  # SUM (the loss is normalised by the global token count), before clipping
            grads = tree_map(lambda g: mx.distributed.all_sum(g, group=self.group, stream=mx.cpu), grads)
        self.optimizer.learning_rate = lr
        limit = max_grad_norm if max_grad_norm > 0 else math.inf
        norm = self._update(grads, mx.array(limit, dtype=mx.float32))
        mx.eval(norm, self.model.trainable_parameters(), self.optimizer.state)  # backward, clip and update: one graph
        value = float(norm)
        finite = math.isfinite(value)
        return StepStats(grad_norm=value, finite=finite, skipped=not finite)

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        self._mode(False)
        totals, count = [], 0
        for part, stream in self._parts(batch):
            v = self._views(part)
            with stream:
                totals.append(mlxloss.loss_sum(self.model, self.head, v.inputs, v.segments, v.picks, v.targets,
                                               v.weights))
            count += v.count
        mx.eval(totals)
        value = sum(float(t) for t in totals)
        self._mode(True)
        return value, count

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        from mlx_lm.generate import generate_step

        self.model.eval()
        out: list[int] = []
        stops = set(stop_ids)
        try:
            for token, _ in generate_step(mx.array(prompt_ids, dtype=mx.int32), self.model, max_tokens=max_new_tokens):
                t = int(token)
                if t in stops:
                    break
                out.append(t)
        finally:
            self.model.train()
        return out

    def logits(self, input_ids: list[list[int]]) -> mx.array:
        """fp32 logits of unpadded rows (eval mode): what parity tests compare."""
        self.model.eval()
        try:
            out = self.model(mx.array(input_ids, dtype=mx.int32)).astype(mx.float32)
            mx.eval(out)
        finally:
            self.model.train()
        return out

    # -- adapters ----------------------------------------------------------------

    def save_adapter(self, out_dir: Path, base_model: str) -> None:
        bad = [p for p, v in tree_flatten(self.model.trainable_parameters()) if not bool(mx.isfinite(v).all())]
        if bad:
            raise ValueError(f"refusing to save non-finite adapter weights: {', '.join(bad[:5])}")
        peft_format.save_peft(self.model, out_dir, base_model=str(base_model), dropout=self.dropout,
                              use_rslora=self.use_rslora)

    def load_adapter(self, adapter_dir: Path) -> None:
        rebuilt, config = peft_format.load_peft(self.model, adapter_dir)
        self.use_rslora = bool(config.get("use_rslora", False))
        if rebuilt:  # new parameters: a fresh optimizer (load_state may restore it next)
            self.dropout = float(config.get("lora_dropout", 0.0))
            self._new_optimizer()  # gradient checkpointing lives on the blocks, which stay
        else:
            self._grads = None
            self._build_steps()  # scales are traced into the compiled step as constants

    # -- state -------------------------------------------------------------------

    def save_state(self, out_dir: Path) -> list[str]:
        out_dir = Path(out_dir)
        flat = dict(tree_flatten(self.optimizer.state))
        step = int(self.optimizer.state["step"].item())
        with atomic_path(out_dir / OPTIMIZER_FILE) as tmp:
            with open(tmp, "wb") as fh:
                mx.save_safetensors(fh, flat, metadata={"format": "mlx", "optimizer": "AdamW", "step": str(step)})
        write_json(out_dir / RNG_FILE, {"backend": "mlx", "seed": self.seed, "draws": self.draws})
        return [OPTIMIZER_FILE, RNG_FILE]

    def load_state(self, in_dir: Path, allow_partial: bool = False) -> None:
        in_dir = Path(in_dir)
        ofile, rfile = in_dir / OPTIMIZER_FILE, in_dir / RNG_FILE
        if not ofile.exists():
            if allow_partial:
                return
            raise UserError(f"{in_dir}: checkpoint has no MLX optimizer state; resuming would change the run "
                            "(pass --allow-partial-resume to continue with a fresh optimizer)", [f"{ofile}: missing"])
        loaded = mx.load(str(ofile))
        current = dict(tree_flatten(self.optimizer.state))
        problems = [f"{ofile}: {k}: missing" for k in current if k not in loaded]
        problems += [f"{ofile}: {k}: not a state of this adapter" for k in loaded if k not in current]
        problems += [f"{ofile}: {k}: shape {tuple(loaded[k].shape)}, expected {tuple(v.shape)}"
                     for k, v in current.items() if k in loaded and loaded[k].shape != v.shape]
        if problems:
            raise UserError(f"{in_dir}: optimizer state does not fit this adapter", problems)
        self.optimizer.state = tree_map_with_path(lambda path, v: loaded[path].astype(v.dtype), self.optimizer.state)
        self.optimizer.init(self.model.trainable_parameters())  # marks it initialised; keeps the loaded values
        if rfile.exists():
            rng = json.loads(rfile.read_text(encoding="utf-8"))
            self.seed, self.draws = int(rng["seed"]), int(rng["draws"])
        self._grads = None
        self._build_steps()

    def peak_memory(self) -> int | None:
        peak = int(mx.get_peak_memory())
        return peak or None

    # -- preference methods (DPO, ORPO): common.train.methods.PreferenceBackend ------------

    def sequence_logps(self, batch: Batch, adapter: bool = True) -> list[tuple[float, int]]:
        return preference.sequence_logps(self, batch, adapter)

    def preference_forward_backward(self, batch, scale: float, spec) -> tuple[float, dict[str, float]]:
        return preference.forward_backward(self, batch, scale, spec)

    def preference_eval(self, batch, spec) -> tuple[float, dict[str, float]]:
        return preference.evaluate(self, batch, spec)


