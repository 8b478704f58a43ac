"""Run one side of a comparison in a fresh process, so its peak memory is its own.

``python -m bench.sides SPEC.json OUT.json``: SPEC says which side (ours through the
loop, or a Hugging Face Trainer baseline), the model, the examples, the per-step plan
and the settings; OUT receives the side's summary (bench.common.Side.summary) plus the
process's max RSS and the load average around the run. :func:`run_in_subprocess` is
the parent's half.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import load_average

REPO = Path(__file__).resolve().parent.parent


def _examples(spec: dict) -> list:
    from bench.data import alpaca_like, load_examples

    src = spec["examples"]
    if "file" in src:
        return load_examples(Path(src["file"]))
    return alpaca_like(**src["synthetic"])


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the side ``spec`` describes in this process; returns its summary."""
    if spec["kind"] == "unsloth":
        import unsloth  # noqa: F401  (before torch's friends: it patches transformers, peft and the Trainer)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("cudnn_sdp") is False:  # diagnosis: keep SDPA off the cuDNN attention backend
        torch.backends.cuda.enable_cudnn_sdp(False)
    if spec.get("cpu_tokens_per_pass"):  # ablation: the CPU row groups of the torch backend
        from torch_ft import plan

        plan.CPU_TOKENS_PER_PASS = int(spec["cpu_tokens_per_pass"])
    if spec.get("store_all"):  # ablation: autograd stores what these recompute
        from torch_ft import lean_mlp, norm_recompute

        lean_mlp.install = lambda *a, **k: 0
        norm_recompute.install = lambda *a, **k: None
    if spec.get("ungrouped"):  # ablation: each LoRA projection on its own, as before torch_ft.lora_forward.SharedInput
        from torch_ft import lora_forward

        real_install = lora_forward.install
        lora_forward.install = lambda model, autocast=False, group=True: real_install(model, autocast, group=False)
    examples = _examples(spec)
    cuda = spec["device"].startswith("cuda")
    start = load_average()
    if spec["kind"] == "ours":
        from bench import ours
        from common.train.loop import TrainData

        cfg = ours.train_config(**spec["cfg"])
        data = TrainData(train=examples, valid=[], pad_id=spec["pad_id"])
        side = ours.run(cfg, Path(spec["model_dir"]), data, spec["steps"], label=spec["label"],
                        backend_name=cfg.backend if cfg.backend != "auto" else "torch", plan=spec.get("plan"),
                        cuda=cuda)
        ours.release(side)
    elif spec["kind"] == "unsloth":
        from bench.baselines import unsloth_side

        c, u = spec["cfg"], spec["unsloth"]
        lora = {"r": c.get("lora_r", 16), "alpha": c.get("lora_alpha", 32.0), "dropout": c.get("lora_dropout", 0.0),
                "targets": spec["targets"]}
        side = unsloth_side.run(spec["model_dir"], examples, spec["plan"], lora=lora, lr=c.get("lr", 2e-4),
                                max_grad_norm=c.get("max_grad_norm", 1.0), seed=c.get("seed", 3407),
                                load_in_4bit=u["load_in_4bit"], offload_gc=u["offload_gc"],
                                max_seq_length=c["max_seq_length"], pad_id=spec["pad_id"], label=spec["label"])
    else:
        from bench.baselines import hf_trainer

        c, hf = spec["cfg"], spec["hf"]
        lora = {"r": c.get("lora_r", 16), "alpha": c.get("lora_alpha", 32.0), "dropout": c.get("lora_dropout", 0.0),
                "targets": spec["targets"]}
        side = hf_trainer.run(spec["model_dir"], examples, spec["plan"], variant=hf["variant"], lora=lora,
                              lr=c.get("lr", 2e-4), max_grad_norm=c.get("max_grad_norm", 1.0), seed=c.get("seed", 3407),
                              device=spec["device"], dtype=spec["dtype"], grad_checkpoint=hf["grad_checkpoint"],
                              pad_id=spec["pad_id"], load_in_4bit=hf.get("load_in_4bit", False),
                              liger=hf.get("liger"), label=spec["label"])
    side.load_average = {"start": start, "end": load_average()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if not cuda:
        side.peak_memory_bytes = int(rss)
        side.memory_kind = "process max RSS"
    out = side.summary(spec.get("warmup", 1))
    out["rss_peak_bytes"] = int(rss)
    return out


def run_in_subprocess(spec: dict[str, Any], *, timeout: float = 3600, env: dict | None = None) -> dict[str, Any]:
    """Run ``spec`` in a child Python; a failure comes back as ``{"label", "error"}`` instead of raising."""
    with tempfile.TemporaryDirectory(prefix="bench-side-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.sides", str(spec_path), str(out_path)], cwd=REPO,
                                  env={**os.environ, **(env or {}), **spec.get("env", {})}, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"label": spec["label"], "error": f"timed out after {timeout:.0f} s"}
        wall = time.time() - t0
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout)[-3000:]
            return {"label": spec["label"], "error": f"exit {proc.returncode}: {tail}", "wall_s": wall}
        out = json.loads(out_path.read_text())
        out["wall_s"] = round(wall, 1)
        if spec.get("keep_log"):  # e.g. Unsloth's banner: its versions and the attention it picked
            out["log_tail"] = (proc.stdout[-3000:] + "\n--- stderr\n" + proc.stderr[-5000:])
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    try:
        out = run_spec(spec)
    except Exception:  # the parent records the failure and goes on with the other sides
        traceback.print_exc()
        return 1
    Path(argv[1]).write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
