"""CPU benchmarks (``make bench``): the embedded SmolLM2-135M on the shipped data/.

``python -m bench.run_cpu [--only torch|mlx|mlx-var] [--quick]``

- ``torch``: our torch backend (the loop's defaults: batch 4, length-grouped, no gradient
  checkpointing, fp32, the batch run in row groups of <= 256 positions, 1 layer in 6 recomputed in
  backward; ablations: the whole
  batch per pass, and gradient checkpointing) vs the seeds' recipe (Trainer + peft, same LoRA and batch settings,
  padded to the longest row, fp32, gradient checkpointing), each side in its own process,
  back to back, the seeds fed exactly our batches. Targets: >= 1.3x tokens/s, peak RSS no higher.
- ``mlx``: our MLX backend vs mlx-lm's trainer on data/ (same batches): >= 1.0x.
- ``mlx-var``: the same on a variable-length set (Alpaca-like lengths in SmolLM2's vocabulary):
  ours packed vs mlx-lm with length-grouped batches: >= 1.5x.

The CPU hosts here are shared: each JSON records the load average at the start and end
of every side; compare ratios only from runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench import common as bc

TORCH_RTOL = 1e-3  # fp32 on both sides; only summation order differs (padding vs not, chunked loss)


def threads() -> int:
    """The torch threads both sides use: OMP_NUM_THREADS, else every core this process may use."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bench_torch(args, out: Path) -> Path:
    from bench import ours
    from bench.data import length_stats, save_examples, shipped
    from bench.sides import run_in_subprocess

    model_dir, data = shipped()
    cfg = ours.train_config(model=str(model_dir), backend="torch", device="cpu", batch_size=args.batch_size)
    plan = ours.step_plan(data.train, cfg, data.pad_id, args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        ex_file = Path(tmp) / "examples.json"
        save_examples(ex_file, data.train)
        c = {k: getattr(cfg, k) for k in ("model", "backend", "device", "dtype", "batch_size", "lora_r", "lora_alpha",
                                          "lora_dropout", "lr", "max_grad_norm", "seed", "group_by_length", "packing")}
        base = {"model_dir": str(model_dir), "examples": {"file": str(ex_file)}, "pad_id": data.pad_id,
                "steps": args.steps, "warmup": args.warmup, "device": "cpu", "dtype": "float32", "plan": plan,
                "threads": threads(), "targets": list(cfg.targets), "cfg": c}
        sides = {}
        for key, spec in (("ours", {"kind": "ours", "label": "ours torch (loop defaults)"}),
                          ("ours_whole", {"kind": "ours", "label": "ours torch, whole batch per pass (no row groups)",
                                          "cpu_tokens_per_pass": 10**9}),
                          ("ours_ckpt", {"kind": "ours", "label": "ours torch, grad ckpt (the seeds' setting)",
                                         "cfg": {**c, "grad_checkpoint": True}}),
                          ("seeds", {"kind": "hf", "label": "seeds: Trainer+peft, padded, fp32, grad ckpt",
                                     "hf": {"variant": "B0", "grad_checkpoint": True}})):
            res = run_in_subprocess({**base, **spec}, timeout=6 * 3600)
            sides[key] = res
            print(f"[cpu torch] {key}: " + (f"{res['tokens_per_s']:.1f} tok/s, peak RSS "
                                            f"{bc.human_bytes(res['peak_memory_bytes'])}, load {res['load_average']}"
                                            if "error" not in res else "FAILED " + res["error"][-1500:]), flush=True)
    result = bc.build_result(
        "cpu_torch_vs_seeds", "SmolLM2-135M (embedded) on data/, fp32 LoRA r=16 on q,k,v,o,gate,up,down, "
        f"batch {args.batch_size}", sides, [("ours", "seeds", 1.3, 1.0, TORCH_RTOL), ("ours_whole", "seeds", None, None, TORCH_RTOL),
                       ("ours_ckpt", "seeds", None, None, TORCH_RTOL)], command=" ".join(sys.argv),
        model={"name": "SmolLM2-135M-Instruct (embedded default)", "dir": str(model_dir)},
        data={"source": "data/ (train split as llm-ft train encodes it)", "lengths": length_stats(data.train)},
        settings={"steps": args.steps, "warmup_steps": args.warmup, "torch_threads": threads(), "loss_rtol": TORCH_RTOL,
                  "lr": cfg.lr, "schedule": "constant", "plan": "ours (length-grouped); the seeds get the same batches"},
        notes=["the seeds' recipe gets our length-grouped batches (Trainer's default sampler would pad more): "
               "the ratio is per-batch efficiency (no gradient checkpointing, loss only on answer tokens, ...)"])
    return bc.write_result(result, out, regenerate_md=out == bc.RESULTS_DIR)


def bench_mlx(args, out: Path, variable: bool) -> Path:
    from bench.data import alpaca_like, length_stats, shipped
    from bench.mlx_compare import payload, run_dataset

    model_dir, data = shipped()
    if variable:
        synthetic = {"n": 1000, "seed": 1, "vocab": 49152, "median": args.var_median, "sigma": 0.75,
                     "max_len": 4 * args.var_median}
        examples, spec, tag = alpaca_like(**synthetic), {"synthetic": synthetic}, "variable"
        sides_wanted = ["ours_mlx", "mlx_lm", "ours_mlx_packed", "mlx_lm_packedplan"]
    else:
        examples, tag = data.train, "data"
        sides_wanted = ["ours_mlx", "mlx_lm"]
        spec = None
    sides, pairs = run_dataset(f"cpu mlx {tag}", model_dir=Path(model_dir), examples=examples, pad_id=data.pad_id,
                               steps=args.mlx_steps, warmup=args.mlx_warmup, batch_size=args.mlx_batch_size,
                               pack_len=args.mlx_pack_len, dtype="float32", device="cpu", examples_spec=spec,
                               torch_device="cpu", sides_wanted=sides_wanted, variable=variable)
    result = payload(f"cpu_mlx_vs_mlxlm_{tag}", f"SmolLM2-135M on MLX (CPU), {tag} lengths, LoRA r=16 all linear, "
                     f"batch {args.mlx_batch_size}", sides, pairs,
                     data={"lengths": length_stats(examples)},
                     settings={"steps": args.mlx_steps, "warmup_steps": args.mlx_warmup, "max_grad_norm": "off"})
    return bc.write_result(result, out, regenerate_md=out == bc.RESULTS_DIR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=["torch", "mlx", "mlx-var"], help="run only these comparisons")
    ap.add_argument("--out", type=Path, default=bc.RESULTS_DIR, help="folder for the result JSON files")
    ap.add_argument("--steps", type=int, default=12, help="torch: optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="torch: first steps left out of the rates")
    ap.add_argument("--batch-size", type=int, default=4, help="torch: examples per step (the loop's default)")
    ap.add_argument("--mlx-steps", type=int, default=6, help="mlx: steps per side (MLX on a CPU is slow)")
    ap.add_argument("--mlx-warmup", type=int, default=2)
    ap.add_argument("--mlx-batch-size", type=int, default=2)
    ap.add_argument("--mlx-pack-len", type=int, default=512)
    ap.add_argument("--var-median", type=int, default=100, help="mlx-var: median example length (tokens)")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 warmup: checks the harness, not a result")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.mlx_steps, args.mlx_warmup = 3, 1, 3, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for what in args.only or ["torch", "mlx", "mlx-var"]:
        path = bench_torch(args, args.out) if what == "torch" else bench_mlx(args, args.out, what == "mlx-var")
        print(f"wrote {path}", flush=True)
    if args.out == bc.RESULTS_DIR:
        print(f"table: {bc.regenerate()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
