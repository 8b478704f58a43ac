"""The memory preflight's estimate against peaks the GPU bench measured.

``python -m bench.preflight_check [RESULT.json ...]`` (CPU only; default: the H100 memory runs of
round 6, made with the code the estimate describes)

For each of our sides in a ``gpu_torch --suite 8b-memory|8b-qlora-memory`` result, the estimate
``train`` would print for the same work (common.models.memory with the torch backend's CUDA plan:
bf16 or a 4-bit base, the result's LoRA rank on all 7 projections, one row of the suite's
max_len positions, the side's memory mode) next to the peak the side measured
(``torch.cuda.max_memory_allocated``, which leaves out the CUDA context: the estimate's
"overhead" part is left out of the ratio for the same reason). ``ours_stored`` is the default
mode with the recompute of layer intermediates taken out (``lean=False``). A ratio at or a little
above 1 is what the preflight needs: an upper bound that does not push a run into a slower mode.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.gpu_torch import SUITES
from bench.models import ALL_LINEAR, CONFIGS
from common.models import memory
from torch_ft.plan import device_plan

HERE = Path(__file__).resolve().parent
DEFAULT = [HERE / "results" / f"gpu_8b{q}-memory_h100_r{r}.json" for r in (3, 4) for q in ("", "-qlora")]
SIDES = {"ours": ("default", True), "ours_stored": ("default", False), "ours_gc": ("checkpoint", True),
         "ours_offload": ("offload", True)}  # side -> (memory mode, recompute of layer intermediates)
GiB = 1 << 30


def rows(path: Path) -> list[dict]:
    result = json.loads(path.read_text(encoding="utf-8"))
    suite = SUITES[result["name"].removeprefix("gpu_")]
    model = {"model_type": "llama", **CONFIGS[suite["model"]]}
    plan = device_plan("cuda:0", "bfloat16")
    out = []
    for key, side in result["sides"].items():
        name = key.split("#")[0]
        if name not in SIDES or "peak_memory_bytes" not in side:
            continue
        mode, lean = SIDES[name]
        est = memory.estimate_training_memory(
            model, plan=plan, load_in_4bit=suite["qlora"], lora_r=result["settings"]["lora_r"], targets=ALL_LINEAR,
            batch_size=suite["rows"], seq_len=suite["max_len"], lean=lean, **memory.MODE_FLAGS[mode])
        counted = est.total_bytes - est.parts["overhead"]
        out.append({"result": path.name, "side": key, "mode": mode, "measured_gib": side["peak_memory_bytes"] / GiB,
                    "estimate_gib": counted / GiB, "ratio": counted / side["peak_memory_bytes"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*", type=Path, default=DEFAULT)
    args = ap.parse_args()
    print("| result | side | mode | measured GiB | estimate GiB (no overhead) | estimate / measured |")
    print("|---|---|---|---|---|---|")
    for path in args.results:
        for r in rows(path):
            print(f"| {r['result']} | {r['side']} | {r['mode']} | {r['measured_gib']:.2f} | {r['estimate_gib']:.2f} "
                  f"| {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
