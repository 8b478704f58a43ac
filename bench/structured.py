"""Structured-output benchmark: generation tokens/s and classifications/s, free against schema-constrained
decoding, on the CPU, for the torch, MLX and llama.cpp engines.

``python -m bench.structured [--run RUN] [--rows 32] [--engines torch,mlx,llama] [--threads 2] [--repeats 3]``

Targets: a run directory (torch and MLX load base + adapter; llama.cpp the newest ``RUN/export/*.gguf``),
or by default the embedded SmolLM2-135M-Instruct and an f16 GGUF of it exported once into ``--workdir``.
Prompts: the first ``--rows`` rows of data/test.jsonl with ./system_prompt.txt; schema: data/schema.json.
Per engine and mode, one warm-up answer, then ``--repeats`` passes (free and constrained interleaved),
each answering every row greedily one at a time; the table gives the median and the range:
tokens/s = generated tokens / generation seconds; classifications/s = rows / seconds, where a
constrained classification includes the enum field's exact probabilities (one scoring pass per row).
Target: the constraint costs <= 15% of llama.cpp's tokens/s. Use a trained run (``--run``): the untrained
default model rambles inside JSON strings until the token limit, so its answers are long and cut off.

Writes ``bench/results/structured/cpu_structured.json`` (outside the folder RESULTS.md is generated
from) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench import common as bc

OVERHEAD_TARGET = 0.15  # largest share of llama.cpp's tokens/s the constraint may cost
OUT = bc.RESULTS_DIR / "structured" / "cpu_structured.json"


def targets(args) -> dict[str, str]:
    """What each engine loads: the run (torch, MLX) and its GGUF, or the default model and an f16 GGUF of it."""
    if args.run:
        ggufs = sorted(Path(args.run, "export").glob("*.gguf"), key=lambda p: p.stat().st_mtime)
        if not ggufs and "llama" in args.engines:
            sys.exit(f"{args.run}/export: no .gguf (run 'llm-ft export {args.run}' first)")
        return {"torch": args.run, "mlx": args.run, "llama": str(ggufs[-1]) if ggufs else ""}
    gguf = Path(args.workdir) / "default-f16.gguf"
    if "llama" in args.engines and not gguf.exists():
        from common.export.cmd import ExportConfig
        from common.export.cmd import run as export

        export(ExportConfig(source="default", quant="f16", out=str(gguf), verify=False))
    return {"torch": "default", "mlx": "default", "llama": str(gguf)}


def measure(engine: str, target: str, prompts: list[list[dict]], fmt, max_new_tokens: int, repeats: int) -> dict:
    """Free and constrained, ``repeats`` times each, interleaved (free, format, free, format...) so a change in
    the shared host's load falls on both modes: per repeat, tokens/s of generation and classifications/s
    (generation plus, constrained, the enum field's probabilities)."""
    from common.generation import load_generator
    from common.structured.confidence import classify_answer
    from common.structured.constraint import use_format

    system = Path("system_prompt.txt").read_text(encoding="utf-8").strip() if Path("system_prompt.txt").exists() else ""
    gen = load_generator(target, backend={"llama": "auto"}.get(engine, engine), system_prompt=system)
    out: dict = {"engine": gen.backend, "target": target, "free": {"runs": []}, "format": {"runs": []}}
    try:
        for mode in ("free", "format"):  # warm-up: first-call costs, caches, the grammar compiled once
            use_format(gen, fmt if mode == "format" else None)
            gen.generate(prompts[0], max_new_tokens=max_new_tokens)
        for _ in range(repeats):
            for mode in ("free", "format"):
                use_format(gen, fmt if mode == "format" else None)
                tokens0, t0 = gen.new_tokens, time.perf_counter()
                answers = [gen.generate(p, max_new_tokens=max_new_tokens) for p in prompts]
                gen_s = time.perf_counter() - t0
                tokens = gen.new_tokens - tokens0
                conf_s = 0.0
                if mode == "format" and fmt.enum is not None:
                    t1 = time.perf_counter()
                    for p, a in zip(prompts, answers, strict=True):
                        classify_answer(gen, gen.chat_prompt(p), a, fmt)
                    conf_s = time.perf_counter() - t1
                valid = sum(1 for a in answers if _valid(a, fmt.schema))
                out[mode]["runs"].append({
                    "rows": len(prompts), "tokens": tokens, "generation_s": round(gen_s, 3),
                    "tokens_per_s": round(tokens / gen_s, 2), "confidence_s": round(conf_s, 3),
                    "classifications_per_s": round(len(prompts) / (gen_s + conf_s), 3),
                    "schema_valid": valid / len(prompts)})
        for mode in ("free", "format"):
            runs = out[mode]["runs"]
            for key in ("tokens_per_s", "classifications_per_s", "schema_valid"):
                values = sorted(r[key] for r in runs)
                out[mode][key] = values[len(values) // 2]  # the median
                out[mode][key + "_range"] = [values[0], values[-1]]
        out["constraint_cost"] = round(1 - out["format"]["tokens_per_s"] / out["free"]["tokens_per_s"], 4)
        costs = sorted(1 - f["tokens_per_s"] / c["tokens_per_s"]
                       for f, c in zip(out["format"]["runs"], out["free"]["runs"], strict=True))
        out["constraint_cost_range"] = [round(costs[0], 4), round(costs[-1], 4)]  # per interleaved pair
    finally:
        use_format(gen, None)
        gen.close()
    return out


def _valid(answer: str, schema: dict) -> bool:
    from common.evaluate.metrics import parse_json, schema_errors

    ok, value = parse_json(answer)
    return ok and not schema_errors(value, schema)


def table(results: list[dict]) -> str:
    """Medians over the repeats, the range (min-max) in brackets."""
    def rng(m: dict, key: str, fmt: str) -> str:
        lo, hi = m[key + "_range"]
        return f"{m[key]:{fmt}} [{lo:{fmt}}-{hi:{fmt}}]"

    lines = ["| engine | decoding | tokens/s | classifications/s | schema valid | constraint cost |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        for mode in ("free", "format"):
            m = r[mode]
            cost = ""
            if mode == "format":
                lo, hi = r["constraint_cost_range"]
                cost = f"{100 * r['constraint_cost']:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}%]"
            lines.append(f"| {r['engine']} | {mode} | {rng(m, 'tokens_per_s', '.1f')} | "
                         f"{rng(m, 'classifications_per_s', '.2f')} | {100 * m['schema_valid']:.1f}% | {cost} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a run directory (default: the embedded model, untrained)")
    ap.add_argument("--rows", type=int, default=32, help="test rows answered per engine and mode")
    ap.add_argument("--engines", default="torch,mlx,llama", help="comma-separated: torch, mlx, llama")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every engine")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the rows per engine and mode")
    ap.add_argument("--workdir", default="/tmp/bench-structured", help="where the default model's GGUF is written")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from common.evaluate.cmd import load_rows, split_row
    from common.structured.schema import load_format

    fmt = load_format("data/schema.json")
    prompts = [split_row(r)[0] for r in load_rows(Path("data/test.jsonl"), args.rows)]
    paths = targets(args)
    results = []
    for engine in args.engines:
        if engine == "torch":
            import torch

            torch.set_num_threads(args.threads)
        results.append(measure(engine, paths[engine], prompts, fmt, args.max_new_tokens, args.repeats))
        print(table(results[-1:]), flush=True)
    llama = next((r for r in results if r["engine"] == "llama.cpp"), None)
    payload = {"name": "cpu_structured", "date": bc.now(), "host": bc.host_info(), "versions": bc.versions(),
               "command": "python -m bench.structured " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": len(prompts), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
               "repeats": args.repeats,
               "results": results,
               "target": {"llama_constraint_cost_at_most": OVERHEAD_TARGET,
                          "met": None if llama is None else llama["constraint_cost"] <= OVERHEAD_TARGET}}
    from common.io import write_json

    write_json(args.out, payload)
    print(table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
