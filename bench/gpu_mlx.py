"""MLX on the device's GPU (mlx-cuda): our MLX and torch backends vs ``mlx_lm.lora`` on a 1B-size model.

``python3 -m bench.gpu_mlx --out $OUT``

Two datasets of synthetic token ids: ``uniform`` (lengths 256 +- 10%, like short chat
rows) and ``variable`` (the Alpaca-like mix, median 200, up to 2048). Sides and
comparisons: bench.mlx_compare. Both backends train bf16 here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import common as bc

DATASETS = {"uniform": {"median": 256, "sigma": 0.1, "max_len": 512},
            "variable": {"median": 200, "sigma": 0.75, "max_len": 2048}}
SIDES = ["ours_mlx", "mlx_lm", "ours_mlx_exact_targets", "ours_mlx_packed", "mlx_lm_packedplan", "ours_torch", "ours_torch_compile",
         "ours_torch_nokernels", "ours_torch_packed"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--out", type=Path, default=bc.RESULTS_DIR)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the rates (MLX compiles new shapes)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pack-len", type=int, default=4096)
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--dataset", action="append", choices=sorted(DATASETS))
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--device", default="gpu", help="MLX device: gpu (CUDA) or cpu (to test this script)")
    args = ap.parse_args(argv)

    from bench.data import alpaca_like, length_stats
    from bench.gpu_torch import MODELS_DIR, _task
    from bench.mlx_compare import payload, run_dataset
    from bench.models import CONFIGS

    gpu = args.device == "gpu"
    model_dir = Path(_task("build", args.model, str(MODELS_DIR / args.model), "cuda" if gpu else "cpu")["path"])
    vocab = CONFIGS[args.model]["vocab_size"]
    for tag in args.dataset or sorted(DATASETS):
        synthetic = {"n": args.examples, "seed": 1, "vocab": vocab, **DATASETS[tag]}
        examples = alpaca_like(**synthetic)
        sides, pairs = run_dataset(
            f"gpu_mlx_{tag}", model_dir=model_dir, examples=examples, pad_id=0, steps=args.steps, warmup=args.warmup,
            batch_size=args.batch_size, pack_len=args.pack_len, dtype="bfloat16" if gpu else "float32",
            device=None if gpu else "cpu", examples_spec={"synthetic": synthetic},
            torch_device="cuda" if gpu else "cpu", sides_wanted=args.sides.split(","), variable=tag == "variable")
        result = payload(f"gpu_mlx_{tag}", f"{args.model} random weights on MLX {'CUDA' if gpu else 'CPU'}, "
                         f"{tag} lengths, LoRA r=16 on all linear layers, batches of {args.batch_size} / packed "
                         f"rows of {args.pack_len}", sides, pairs, gpu=gpu,
                         data={"synthetic": synthetic, "lengths": length_stats(examples)},
                         settings={"steps": args.steps, "warmup_steps": args.warmup, "lr": 2e-4,
                                   "schedule": "constant", "max_grad_norm": "off (mlx-lm does not clip)"})
        print(f"wrote {bc.write_result(result, args.out, regenerate_md=False)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
