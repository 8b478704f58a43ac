"""Peak memory of a DPO step against an SFT step of the same sequences (torch backend).

Each mode runs in a fresh process (peak RSS on the CPU, or CUDA's peak allocation, is a
per-process maximum): setup, one step, and the step's peak minus the memory after setup.
The SFT step trains the same 2 x pairs sequences (chosen and rejected answers) as examples;
DPO runs the policy with gradients plus the reference (adapter disabled, no gradients) in
the same step; ``dpo-precomputed`` takes the reference from a cache, so it runs the policy
only. The issue's target: DPO <= 1.15x SFT.

    python -m bench.preference_memory [--hidden 512 --layers 4 --length 256 --pairs 4 --device cpu]

Prints a markdown row per mode (for bench/RESULTS.md) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("sft", "dpo", "dpo-precomputed")


def one(mode: str, model_dir: str, length: int, pairs: int, device: str) -> dict:
    import numpy as np

    from common.options import TrainConfig
    from common.preference_data import PairExample
    from common.rows import Example
    from common.train.batching import make_batch
    from common.train.methods import PreferenceSpec, make_pair_batch
    from torch_ft.backend import TorchBackend

    cfg = TrainConfig(device=device, dtype="float32", lora_r=16, seed=0)
    b = TorchBackend()
    b.setup(Path(model_dir), cfg, 0)
    rng = np.random.default_rng(0)
    prompt = length // 2
    ps = []
    for _ in range(pairs):
        sides = [Example([int(x) for x in rng.integers(3, 399, length)], [0] * prompt + [1] * (length - prompt))
                 for _ in range(2)]
        ps.append(PairExample(sides[0], sides[1], ref=(-100.0, -110.0) if mode == "dpo-precomputed" else None))
    base = b.peak_memory() or 0
    if mode == "sft":
        batch = make_batch([[e] for p in ps for e in (p.chosen, p.rejected)], 0)
        b.forward_backward(batch, 1.0 / batch.n_supervised)
    else:
        b.preference_forward_backward(make_pair_batch(ps, 0), 1.0 / pairs, PreferenceSpec("dpo"))
    b.optimizer_step(1e-4, 1.0)
    peak = b.peak_memory() or 0
    return {"mode": mode, "peak_bytes": peak, "step_bytes": peak - base}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=256, help="tokens per answer sequence (half of it prompt)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", help="a model directory (default: a random llama of --hidden/--layers)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.model, args.length, args.pairs, args.device)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny import make_model

            model = str(make_model(Path(tmp) / "model", hidden=args.hidden, layers=args.layers))
        rows = {}
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "bench.preference_memory", "--one", mode, "--model", model,
                                  "--length", str(args.length), "--pairs", str(args.pairs), "--device", args.device],
                                 check=True, capture_output=True, text=True).stdout
            rows[mode] = json.loads(out.strip().splitlines()[-1])
    sft = rows["sft"]["step_bytes"] or 1
    print("| mode | peak | step (peak - after setup) | step / SFT step |")
    print("|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['peak_bytes'] / 2**20:.0f} MiB | {r['step_bytes'] / 2**20:.0f} MiB | "
              f"{r['step_bytes'] / sft:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
