"""Baseline: mlx-lm's own LoRA trainer (``mlx_lm.tuner.trainer.train``, what ``mlx_lm.lora`` runs), in-process.

Same model, LoRA rank/scale/targets/layers, learning rate and examples per step as our
run. Three things are set to match our recipe so the per-step losses are comparable, none
of which changes its speed: the optimizer is Adam with bias correction (mlx-lm's CLI
default leaves it off; ours is torch's AdamW, weight decay 0 here); the LoRA matrices
start from ours (``init``: same distribution, different random stream otherwise); and
each row's loss range ends at its last supervised token (mlx-lm's mask takes
``offset <= k <= length`` inclusive, one position past the row; we pass ``length - 1``).
Batches are built the way mlx-lm builds them (padded to 1 + a multiple of 32).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import Side
from common.rows import Example

PAD_TO = 32  # mlx-lm pads each batch to 1 + a multiple of 32 tokens


def answer_span(ex: Example) -> tuple[int, int]:
    """(first, last) index of the supervised tokens; mlx-lm can only express one contiguous span."""
    ones = [k for k, m in enumerate(ex.loss_mask) if m and k > 0]
    if not ones:
        raise ValueError("example without supervised tokens")
    if ones[-1] - ones[0] + 1 != len(ones):
        raise ValueError("mlx-lm's loss mask is one contiguous span; this example has several")
    return ones[0], ones[-1]


def collate(examples: Sequence[Example]):
    """mlx-lm's batch: (tokens (B, 1 + 32k), [(offset, last)] per row)."""
    import mlx.core as mx
    import numpy as np

    width = 1 + PAD_TO * ((max(len(e) for e in examples) + PAD_TO - 1) // PAD_TO)
    arr = np.zeros((len(examples), width), np.int32)
    spans = []
    for j, e in enumerate(examples):
        arr[j, :len(e)] = e.input_ids
        spans.append(answer_span(e))
    return mx.array(arr), mx.array(spans), width


def lora_keys(targets: Sequence[str]) -> list[str]:
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return [f"self_attn.{t}" if t in attn else f"mlp.{t}" for t in targets]


def run(model_dir, examples: Sequence[Example], plan: list[list[int]], *, lora: dict, lr: float, seed: int,
        init: dict | None = None, label: str = "mlx_lm.lora") -> Side:
    """Train ``len(plan)`` steps with mlx-lm's trainer; step time is wall time between its per-step reports."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    mx.random.seed(seed)
    mx.reset_peak_memory()
    model, _ = load_model(Path(model_dir))
    model.freeze()
    n_layers = lora.get("num_layers") or len(model.layers)
    linear_to_lora_layers(model, n_layers, {"rank": lora["r"], "scale": lora["alpha"] / lora["r"],
                                            "dropout": lora.get("dropout", 0.0), "keys": lora_keys(lora["targets"])})
    if init is not None:
        model.load_weights(list(init.items()), strict=False)
        mine = dict(tree_flatten(model.trainable_parameters()))
        missing = sorted(set(mine) ^ set(init))
        if missing:
            raise ValueError(f"LoRA parameters differ from ours: {missing[:5]}")
    optimizer = optim.Adam(learning_rate=lr, bias_correction=True)
    side = Side(label)
    widths: list[int] = []

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        for idx in plan:
            batch, spans, width = collate([examples[i] for i in idx])
            widths.append(width * len(idx))
            yield batch, spans

    marks: list[float] = []
    reports: list[dict] = []

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info):
            marks.append(time.perf_counter())
            reports.append(dict(info))

    with tempfile.TemporaryDirectory(prefix="bench-mlxlm-") as tmp:
        args = TrainingArgs(batch_size=max(len(p) for p in plan), iters=len(plan), val_batches=0, steps_per_report=1,
                            steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=10**6,
                            adapter_file=str(Path(tmp) / "adapters.safetensors"))
        marks.append(time.perf_counter())
        train(model, optimizer, train_dataset=list(range(len(plan))), val_dataset=None, args=args,
              iterate_batches=iterate_batches, training_callback=Callback())
    side.step_times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    side.losses = [r["train_loss"] for r in reports]
    for i, idx in enumerate(plan):
        side.tokens.append(sum(len(examples[j]) for j in idx))
        side.computed.append(widths[i] - len(idx))  # the trainer drops the last column (inputs = batch[:, :-1])
    side.peak_memory_bytes = int(mx.get_peak_memory())
    side.memory_kind = "mlx peak"
    side.extra["compiled_shapes"] = len(set(zip(map(len, plan), widths, strict=True)))  # its step is traced per shape
    side.extra["mlx_lm_train_time_s"] = [1.0 / r["iterations_per_second"] for r in reports]
    side.settings = {"trainer": "mlx_lm.tuner.trainer.train", "optimizer": "Adam(bias_correction=True)", "lr": lr,
                     "lora": dict(lora), "scale": lora["alpha"] / lora["r"], "keys": lora_keys(lora["targets"]),
                     "layers": n_layers, "grad_checkpoint": False, "compiled_step": True, "seed": seed,
                     "initialised_from_ours": init is not None}
    del model, optimizer
    mx.clear_cache()
    return side
