"""The longest sequence that trains at batch 1 (QLoRA by default), ours vs B0, on the device's GPU.

``python3 -m bench.gpu_longest --model llama-3.1-8b --out $OUT``

Each side loads the model once in its own process, then tries one full optimizer step
(forward, backward, AdamW) on a single example of each length, doubling until a CUDA
out-of-memory error, then bisects once between the last success and the failure. Half
of each example is prompt (no loss), half answer. Ours runs the loop's batch through our
backend with gradient checkpointing on (the flag a user sets for long rows); B0 is the
seeds' recipe (peft + prepare_model_for_kbit_training with gradient checkpointing, Hugging
Face's loss over full-vocabulary logits).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import common as bc
from bench.models import ALL_LINEAR

LENGTHS = [8192, 16384, 32768, 65536, 131072]


def _example(n: int, vocab: int):
    import torch

    from common.rows import Example

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, vocab, (n,), generator=g).tolist()
    return Example(input_ids=ids, loss_mask=[0] * (n // 2) + [1] * (n - n // 2))


def _try_lengths(step, lengths: list[int], clear) -> dict[int, dict]:
    """Run ``step(n)`` for growing n; stop at the first OOM, then bisect once."""
    import torch

    results: dict[int, dict] = {}

    def attempt(n: int) -> bool:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            step(n)
            torch.cuda.synchronize()
            results[n] = {"ok": True, "s": round(time.perf_counter() - t0, 2),
                          "peak_bytes": int(torch.cuda.max_memory_allocated())}
        except torch.cuda.OutOfMemoryError as exc:
            results[n] = {"ok": False, "error": str(exc).splitlines()[0][:200]}
        clear()
        print(f"  length {n}: {results[n]}", flush=True)
        return results[n]["ok"]

    last_ok = None
    for n in lengths:
        if not attempt(n):
            if last_ok is not None:
                mid = (last_ok + n) // 2 // 1024 * 1024
                if mid > last_ok:
                    attempt(mid)
            break
        last_ok = n
    return results


def side_ours(model_dir: str, lengths: list[int], vocab: int) -> dict:
    import torch

    from bench.ours import train_config
    from common.backends import load_backend
    from common.train.batching import make_batch

    cfg = train_config(model=model_dir, backend="torch", load_in_4bit=True, grad_checkpoint=True, batch_size=1,
                       targets=list(ALL_LINEAR), lora_r=16, lora_alpha=32.0, max_seq_length=max(lengths))
    backend = load_backend("torch")
    backend.setup(Path(model_dir), cfg, 0)

    def step(n: int) -> None:
        batch = make_batch([[_example(n, vocab)]], 0)
        backend.forward_backward(batch, 1.0 / batch.n_supervised)
        backend.optimizer_step(2e-4, 1.0)

    def clear() -> None:
        backend.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()

    return _try_lengths(step, lengths, clear)


def side_b0(model_dir: str, lengths: list[int], vocab: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from bench.baselines.hf_trainer import load_model

    model = load_model(model_dir, dtype=torch.bfloat16, device="cuda", load_in_4bit=True, grad_checkpoint=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_LINEAR),
                                             task_type="CAUSAL_LM"))
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)

    def step(n: int) -> None:
        ex = _example(n, vocab)
        ids = torch.tensor([ex.input_ids], device="cuda")
        labels = torch.tensor([[t if m else -100 for t, m in zip(ex.input_ids, ex.loss_mask, strict=False)]], device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as Trainer(bf16=True) runs it
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def clear() -> None:
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()

    return _try_lengths(step, lengths, clear)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--out", type=Path, default=bc.RESULTS_DIR)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--side", choices=["ours", "B0"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from bench.models import CONFIGS

    lengths = [int(x) for x in args.lengths.split(",")]
    vocab = CONFIGS[args.model]["vocab_size"]
    if args.side:  # child
        fn = side_ours if args.side == "ours" else side_b0
        print("RESULT " + json.dumps(fn(args.model_dir, lengths, vocab)))
        return 0
    from bench.gpu_torch import MODELS_DIR, _task

    model_dir = _task("build", args.model, str(MODELS_DIR / args.model), "cuda")["path"]
    found: dict[str, dict] = {}
    for side in ("ours", "B0"):
        proc = subprocess.run([sys.executable, "-m", "bench.gpu_longest", "--side", side, "--model", args.model,
                               "--model-dir", model_dir, "--lengths", args.lengths], capture_output=True, text=True,
                              timeout=1500)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            found[side] = {"error": (proc.stderr or proc.stdout)[-2000:]}
        else:
            tries = {int(k): v for k, v in json.loads(line[7:]).items()}
            ok = [n for n, v in tries.items() if v["ok"]]
            found[side] = {"tries": tries, "longest_ok": max(ok) if ok else None}
        print(f"[longest] {side}: {found[side].get('longest_ok')} {proc.stdout[-1500:] if line is None else ''}"
              f"{proc.stderr[-1500:] if line is None else ''}", flush=True)
    payload = {"name": f"gpu_longest_{args.model}_qlora", "title": f"longest batch-1 QLoRA sequence, {args.model}",
               "created": bc.now(), "command": " ".join(sys.argv), "host": bc.host_info(gpu=True),
               "versions": bc.versions(), "sides": {}, "comparisons": [],
               "other": {"longest_trainable_tokens": {k: v.get("longest_ok") for k, v in found.items()},
                         "tries": found},
               "notes": ["ours: our backend, QLoRA nf4, --grad-checkpoint; B0: peft + prepare_model_for_kbit_training "
                         "with gradient checkpointing, transformers' loss; one optimizer step per length, batch 1"]}
    bc.write_result(payload, args.out, regenerate_md=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
