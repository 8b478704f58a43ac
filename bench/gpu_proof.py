"""The training issue's GPU proof: ``llm-ft train`` (the real CLI) on a 1B-size random-weight model.

``python3 -m bench.gpu_proof --tokenizer .benchtok --out $OUT``

Two runs on the shipped data/: bf16 LoRA and QLoRA (nf4), each as a user would type it;
their summary.json (tokens/s, peak memory, losses) goes into one result JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import common as bc

RUNS = {"bf16": [], "qlora": ["--load-in-4bit"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--tokenizer", type=Path, required=True, help="tokenizer files to put beside the weights")
    ap.add_argument("--out", type=Path, default=bc.RESULTS_DIR)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--extra", default="--batch-size 8 --packing", help="more llm-ft train flags for both runs")
    args = ap.parse_args(argv)
    from bench.gpu_torch import MODELS_DIR, _task

    model_dir = Path(MODELS_DIR / f"{args.model}-tok")
    if not model_dir.exists():
        src = Path(_task("build", args.model, str(MODELS_DIR / args.model), "cuda")["path"])
        model_dir.mkdir(parents=True)
        for f in src.iterdir():  # the same weights, plus a tokenizer with a chat template
            (model_dir / f.name).symlink_to(f.resolve())
        for f in args.tokenizer.iterdir():
            (model_dir / f.name).write_bytes(f.read_bytes())
    sides, logs = {}, {}
    for name, flags in RUNS.items():
        run_dir = Path(f"/tmp/proof-{name}-{int(time.time())}")
        cmd = [sys.executable, "-m", "common", "train", "--model", str(model_dir), "--data", "data", "--out",
               str(run_dir), "--max-steps", str(args.steps), "--eval-every", "0", "--save-every", "0",
               *args.extra.split(), *flags]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wall = time.time() - t0
        logs[name] = (proc.stdout + proc.stderr)[-2500:]
        print(f"[proof {name}] exit {proc.returncode} in {wall:.0f}s\n{logs[name][-1500:]}", flush=True)
        summary_file = run_dir / "summary.json"
        if proc.returncode != 0 or not summary_file.exists():
            sides[name] = {"label": name, "error": logs[name]}
            continue
        s = json.loads(summary_file.read_text())
        losses = [e["loss"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                  if e.get("event") == "train" and "loss" in e]
        sides[name] = {"label": f"llm-ft train {' '.join(flags) or '(bf16 LoRA)'}", "tokens_per_s": s["tokens_per_s"],
                       "peak_memory_bytes": s["peak_memory_bytes"], "memory_kind": "cuda max allocated (backend)",
                       "step_time_median_s": s["train_time_s"] / max(1, s["steps"]), "step_time_p90_s": float("nan"),
                       "timed_steps": s["steps"], "losses": losses, "summary": s, "wall_s": round(wall, 1),
                       "command": " ".join(cmd[1:])}
    payload = bc.build_result("gpu_train_proof", f"llm-ft train on {args.model} random weights (SmolLM2 tokenizer), "
                              f"data/, {args.steps} steps, {args.extra}", sides, [], command=" ".join(sys.argv),
                              gpu=True, notes=["step time here is train_time / steps (mean), from summary.json"])
    bc.write_result(payload, args.out, regenerate_md=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
