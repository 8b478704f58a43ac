"""Our MLX backend (and our torch backend) against ``mlx_lm.lora``, on the same model and examples.

Used by the CPU runner (SmolLM2 on data/) and the device runner (a 1B-size model on MLX's
CUDA backend). Per dataset, in this order:

- ``mlx_lm``: mlx-lm's trainer on our length-grouped plan (batches of similar length, as
  mlx-lm's own iterator sorts them), LoRA initialised from ours;
- ``ours_mlx``: our MLX backend through the loop on that same plan (per-step losses compared);
  ``ours_mlx_exact_targets``: the same with the target count rounded to a multiple of 32 only (round 4);
- ``ours_mlx_packed``: our MLX backend with packing (its own plan: speed only);
- ``ours_torch`` / ``ours_torch_packed``: our torch backend, the same two ways, in a child process
  (``ours_torch_compile``: length-grouped with ``--compile on``).

MLX sides run in this process, one after another (peak memory reset between them).
"""

from __future__ import annotations

import gc
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import common as bc

MLX_RTOL = {"float32": 2e-3, "bfloat16": 2e-2}


def _mlx_side(fn, *args, **kwargs) -> dict:
    import mlx.core as mx

    try:
        start = bc.load_average()
        side = fn(*args, **kwargs)
        side.load_average = {"start": start, "end": bc.load_average()}
        return side
    except Exception as exc:  # record and go on with the other sides
        import traceback

        return {"label": getattr(fn, "__name__", "?"), "error": f"{exc!r}\n{traceback.format_exc()[-2500:]}"}
    finally:
        gc.collect()
        mx.clear_cache()


def run_dataset(tag: str, *, model_dir: Path, examples: list, pad_id: int, steps: int, warmup: int, batch_size: int,
                pack_len: int, dtype: str, device: str, examples_spec: dict, torch_device: str,
                sides_wanted: list[str], variable: bool, extra_cfg: dict | None = None) -> tuple[dict, list]:
    """Run the sides of one dataset; returns (summaries by key, comparison pairs)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from bench import ours
    from bench.baselines import mlx_lm_lora
    from bench.sides import run_in_subprocess
    from common.train.loop import TrainData

    common_cfg = dict(model=str(model_dir), lora_r=16, lora_alpha=32.0, max_grad_norm=0.0, seed=3407,
                      batch_size=batch_size, group_by_length=True, packing=False, device=device,
                      dtype="auto", **(extra_cfg or {}))
    cfg_g = ours.train_config(backend="mlx", **common_cfg)
    cfg_p = ours.train_config(backend="mlx", **{**common_cfg, "packing": True, "max_seq_length": pack_len,
                                                "batch_size": 1})
    plan = ours.step_plan(examples, cfg_g, pad_id, steps)
    data = TrainData(train=examples, valid=[], pad_id=pad_id)
    out: dict[str, Any] = {}
    init: dict = {}

    def snapshot(backend) -> None:
        init.update({k: mx.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())})

    def summarize(key: str, side) -> None:
        if isinstance(side, dict):
            out[key] = side
        else:
            out[key] = side.summary(warmup)
            out[key]["extra"].pop("_backend", None)
        print(f"[{tag}] {key}: " + (f"{out[key]['tokens_per_s']:,.0f} tok/s, peak "
                                    f"{bc.human_bytes(out[key].get('peak_memory_bytes'))}" if "error" not in out[key]
                                    else "FAILED " + out[key]["error"][-600:]), flush=True)

    def watch_shapes(backend, shapes: set, exact_targets: bool) -> None:
        """Records the distinct (inputs, targets) shapes the compiled step sees (each one is a trace)."""
        if exact_targets:
            backend.target_bits = None  # round 4's shapes: the target count to a multiple of 32 only
        views = backend._views

        def recorded(batch):
            v = views(batch)
            shapes.add((tuple(v.inputs.shape), int(v.picks.shape[0])))
            return v

        backend._views = recorded

    def ours_mlx(key: str, label: str, first: bool, exact_targets: bool = False) -> None:
        shapes: set = set()

        def after_setup(backend) -> None:
            if first:
                snapshot(backend)
            watch_shapes(backend, shapes, exact_targets)

        mx.reset_peak_memory()
        s = _mlx_side(ours.run, cfg_g, model_dir, data, steps, label=label, backend_name="mlx", plan=plan,
                      after_setup=after_setup)
        if not isinstance(s, dict):
            s.peak_memory_bytes, s.memory_kind = int(mx.get_peak_memory()), "mlx peak"
            s.extra["compiled_shapes"] = len(shapes)
            ours.release(s)
        summarize(key, s)

    if "ours_mlx" in sides_wanted or "mlx_lm" in sides_wanted:
        ours_mlx("ours_mlx", "ours MLX, length-grouped", first=True)
    if "ours_mlx_exact_targets" in sides_wanted:
        ours_mlx("ours_mlx_exact_targets", "ours MLX, length-grouped, target count to a multiple of 32 only",
                 first=False, exact_targets=True)
    if "mlx_lm" in sides_wanted:
        targets = list(cfg_g.targets)
        s = _mlx_side(mlx_lm_lora.run, model_dir, examples, plan, lora={"r": 16, "alpha": 32.0, "targets": targets},
                      lr=cfg_g.lr, seed=3407, init=init or None, label="mlx_lm.lora trainer, same batches")
        summarize("mlx_lm", s)
    if "ours_mlx_packed" in sides_wanted:
        plan_p = ours.step_plan(examples, cfg_p, pad_id, steps)
        if "mlx_lm_packedplan" in sides_wanted:  # the same batches as our packed run, padded: checks packing's losses
            s = _mlx_side(mlx_lm_lora.run, model_dir, examples, plan_p, lora={"r": 16, "alpha": 32.0,
                          "targets": list(cfg_g.targets)}, lr=cfg_g.lr, seed=3407, init=init or None,
                          label="mlx_lm.lora trainer, our packed steps' examples padded")
            summarize("mlx_lm_packedplan", s)
        mx.reset_peak_memory()
        s = _mlx_side(ours.run, cfg_p, model_dir, data, steps, label=f"ours MLX, packed rows of {pack_len}",
                      backend_name="mlx", plan=plan_p)
        if not isinstance(s, dict):
            s.peak_memory_bytes, s.memory_kind = int(mx.get_peak_memory()), "mlx peak"
            ours.release(s)
        summarize("ours_mlx_packed", s)
    for key, cfg, p in (("ours_torch", cfg_g, plan), ("ours_torch_compile", replace(cfg_g, compile="on"), plan),
                        ("ours_torch_nokernels", replace(cfg_g, kernels="off"), plan),
                        ("ours_torch_packed", cfg_p, None)):
        if key not in sides_wanted:
            continue
        c = {k: getattr(cfg, k) for k in ("model", "lora_r", "lora_alpha", "max_grad_norm", "seed", "batch_size",
                                          "group_by_length", "packing", "max_seq_length", "compile", "kernels")}
        c.update(backend="torch", device=torch_device, dtype=dtype)
        spec = {"kind": "ours", "label": f"ours torch, {'packed' if cfg.packing else 'length-grouped'}"
                                         + (", torch.compile" if cfg.compile == "on" else "")
                                         + (", no fused kernels" if cfg.kernels == "off" else ""),
                "model_dir": str(model_dir), "examples": examples_spec, "pad_id": pad_id, "steps": steps,
                "warmup": warmup, "device": torch_device, "dtype": dtype, "cfg": c, "plan": p}
        summarize(key, run_in_subprocess(spec, timeout=1500))
    rtol = MLX_RTOL[dtype]
    # Variable lengths: the 1.5x target is ours packed against mlx-lm with its length-sorted batches (different
    # batches, so no per-step losses); the packed run's losses are checked against mlx-lm fed its exact steps.
    pairs = [("ours_mlx", "mlx_lm", 1.0, None, rtol), ("ours_mlx", "ours_mlx_exact_targets", None, None, rtol),
             ("ours_mlx_packed", "mlx_lm", 1.5 if variable else None, None, None),
             ("ours_mlx_packed", "mlx_lm_packedplan", None, None, rtol),
             ("ours_torch", "mlx_lm", 1.0, None, rtol), ("ours_torch_compile", "mlx_lm", None, None, rtol),
             ("ours_torch_nokernels", "mlx_lm", None, None, rtol), ("ours_torch", "ours_torch_nokernels", None, None, rtol),
             ("ours_torch_packed", "mlx_lm", None, None, None)]
    return out, pairs


def payload(name: str, title: str, sides: dict, pairs: list, **fields) -> dict:
    return bc.build_result(name, title, sides, pairs, command=" ".join(sys.argv), **fields)
