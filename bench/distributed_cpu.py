"""CPU data parallelism: 1 process vs 2 at the same global batch: torch (gloo; plain and --fsdp) and MLX
(mlx.launch, ring backend over 127.0.0.1).

    PYTHONPATH=. python -m bench.distributed_cpu [--repeats 3] [--steps 20] [--backends torch,mlx]

A tiny 2-layer llama (tests/tiny.py) on the shipped data, batch 1, global batch 4 (1 x 4, or
2 ranks x 2), fp32. It measures what the ranks cost here (process start, gloo all-reduces,
FSDP all-gathers), not a speed-up: the ranks share the machine's cores. Writes
bench/results/distributed_cpu.json and prints a markdown table (min-max over the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# name -> (backend, processes, grad_accum, extra flags); MLX's 2 processes: mlx.launch, ring backend on 127.0.0.1
SETUPS = {"torch, 1 process, grad_accum 4": ("torch", 1, 4, []),
          "torch, 2 processes (DDP, gloo), grad_accum 2": ("torch", 2, 2, []),
          "torch, 2 processes (--fsdp, gloo), grad_accum 2": ("torch", 2, 2, ["--fsdp"]),
          "MLX, 1 process, grad_accum 4": ("mlx", 1, 4, []),
          "MLX, 2 processes (mlx.launch, ring), grad_accum 2": ("mlx", 2, 2, [])}


def one_run(model: Path, data: Path, out: Path, backend: str, nproc: int, accum: int, extra: list[str],
            steps: int) -> dict:
    cmd = [sys.executable, "-m", "common.cli", "train", "--model", str(model), "--data", str(data), "--out", str(out),
           "--backend", backend, "--device", "cpu", "--dtype", "float32", "--max-steps", str(steps),
           "--batch-size", "1", "--grad-accum", str(accum), "--lora-r", "8", "--eval-every", "0", "--save-every", "0",
           "--sample-prompts", "0", "--max-seq-length", "256", "--seed", "1", "--nproc", str(nproc), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 2), "train_time_s": s["train_time_s"], "tokens_per_s": s["tokens_per_s"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backends", default="torch,mlx", help="comma list of the backends to run")
    args = ap.parse_args()
    setups = {k: v for k, v in SETUPS.items() if v[0] in args.backends.split(",")}
    from tiny import make_model
    from tiny_run import copy_data

    rows: dict[str, list[dict]] = {k: [] for k in setups}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_model(model, "llama")
        data = copy_data(Path(tmp) / "data", train=48, valid=0, test=0)
        for r in range(args.repeats):  # interleaved, so a busy moment of the host hits every setup
            for name, (backend, nproc, accum, extra) in setups.items():
                run_dir = Path(tmp) / f"run-{r}-{backend}-{nproc}-{len(extra)}"
                rows[name].append(one_run(model, data, run_dir, backend, nproc, accum, extra, args.steps))
    out = ROOT / "bench" / "results" / "distributed_cpu.json"
    out.write_text(json.dumps({"steps": args.steps, "cpus": os.cpu_count(), "runs": rows}, indent=1) + "\n")
    print("| setup | tokens/s (train loop) | wall s (incl. start) |\n|---|---|---|")
    for name, runs in rows.items():
        tps = [x["tokens_per_s"] for x in runs]
        wall = [x["wall_s"] for x in runs]
        print(f"| {name} | {min(tps):,.0f}-{max(tps):,.0f} | {min(wall):.1f}-{max(wall):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
