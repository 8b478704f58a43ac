"""Profile our torch backend's training steps on the device (``python3 -m bench.gpu_profile``).

The 1B uniform-length set of bench.gpu_mlx, length-grouped batches of 16 (or, with ``--suite``,
the packed rows of a bench.gpu_torch suite, e.g. ``--suite 8b-memory``): a few steps to warm up,
then torch.profiler over the next ones: where GPU time goes by kernel and by kind of kernel, and
how much of a step the GPU spends idle (launch-bound).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", default="off")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--timed", type=int, default=12, help="unprofiled steps timed after the warm-up")
    ap.add_argument("--flat-multiple", type=int, default=None, help="override torch_ft.backend.FLAT_MULTIPLE")
    ap.add_argument("--suite", default=None, help="a bench.gpu_torch suite: its model and packed rows instead")
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench import ours
    from bench.data import alpaca_like
    from bench.gpu_mlx import DATASETS
    from bench.gpu_torch import MODELS_DIR, _task
    from bench.models import CONFIGS
    from common.backends import load_backend
    from common.train.loop import TrainData, Trainer

    if args.suite:  # the suite's model, data and packed rows, as bench.gpu_torch's "ours" side trains them
        from bench.gpu_torch import SUITES
        from bench.models import ALL_LINEAR

        suite = SUITES[args.suite]
        args.model = suite["model"]
        model_dir = Path(_task("build", args.model, str(MODELS_DIR / args.model), "cuda")["path"])
        examples = alpaca_like(n=3000, seed=0, vocab=CONFIGS[args.model]["vocab_size"], median=200, max_len=2048)
        cfg = ours.train_config(model=str(model_dir), backend="torch", lora_r=16, lora_alpha=32.0, seed=3407,
                                targets=list(ALL_LINEAR), load_in_4bit=suite["qlora"], packing=True,
                                max_seq_length=suite["max_len"], batch_size=suite["rows"], dtype="bfloat16",
                                compile=args.compile, kernels=args.kernels)
    else:
        model_dir = Path(_task("build", args.model, str(MODELS_DIR / args.model), "cuda")["path"])
        examples = alpaca_like(n=3000, seed=1, vocab=CONFIGS[args.model]["vocab_size"], **DATASETS["uniform"])
        cfg = ours.train_config(model=str(model_dir), backend="torch", lora_r=16, lora_alpha=32.0, max_grad_norm=0.0,
                                seed=3407, batch_size=16, group_by_length=True, packing=False, dtype="bfloat16",
                                compile=args.compile, kernels=args.kernels)
    data = TrainData(train=examples, valid=[], pad_id=0)
    if args.flat_multiple is not None:
        import torch_ft.backend

        torch_ft.backend.FLAT_MULTIPLE = args.flat_multiple
    backend = load_backend("torch")
    info = backend.setup(model_dir, cfg, 0)
    print("notes:", "; ".join(info.notes))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, backend, data, Path(tmp), base_model=str(model_dir), run_info={}, log=None)
        trainer.total_steps = 100
        for _ in range(5):
            trainer.train_step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.timed):
            t = time.perf_counter()
            trainer.train_step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"kernels={args.kernels} compile={args.compile} flat_multiple={args.flat_multiple}: {args.timed} steps unprofiled, median "
              f"{1000 * times[len(times) // 2]:.1f} ms, min {1000 * times[0]:.1f} ms", flush=True)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                trainer.train_step()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    # Kernel records only (device_type CUDA): the operator rows repeat their kernels' time.
    gpu_total = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6  # us -> s
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    print(f"{args.steps} steps: wall {wall:.3f} s (profiled), GPU kernel time {gpu_total:.3f} s "
          f"({100 * gpu_total / wall:.0f}% busy), {kernels / args.steps:.0f} kernels per step")
    kinds: dict[str, float] = {}
    for e in events:
        if e.device_type.name == "CUDA":
            kinds[_kind(e.key)] = kinds.get(_kind(e.key), 0.0) + e.self_device_time_total / 1e6
    print("GPU time by kind of kernel, per step: " + ", ".join(
        f"{k} {1000 * v / args.steps:.1f} ms" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    return 0


def _kind(name: str) -> str:
    """A kernel's kind, from its name: matmul, attention, Triton (Liger), elementwise, reduction, copy, other."""
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")):
        return "matmul"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if "triton" in n or ("_kernel" in n and "at::" not in n):
        return "triton"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copy"
    if "reduce" in n or "norm" in n:
        return "reduction"
    if "elementwise" in n or "vectorized" in n:
        return "elementwise"
    return "other"


if __name__ == "__main__":
    raise SystemExit(main())
