"""llm-ft from Python: check the data, train a LoRA adapter, evaluate it, export a GGUF, classify.

    python examples/quickstart.py            # from the repository root, after `make setup`

The same steps as examples/quickstart.ipynb and the README's Quickstart. The settings below
come from the environment so the test suite can run it in seconds (a few steps, a few rows);
leave them unset for a real run (the default model, the shipped data, two epochs).
"""

from __future__ import annotations

import os
from pathlib import Path

import llm_ft

HERE = Path(__file__).resolve().parent
MODEL = os.environ.get("LLM_FT_EXAMPLE_MODEL", "default")  # a Hub id, a local model, a .gguf, or "default"
DATA = os.environ.get("LLM_FT_EXAMPLE_DATA", str(HERE.parent / "data"))
OUT = os.environ.get("LLM_FT_EXAMPLE_OUT", "runs/quickstart")
STEPS = os.environ.get("LLM_FT_EXAMPLE_STEPS")  # unset: two epochs
ROWS = os.environ.get("LLM_FT_EXAMPLE_ROWS")  # unset: the whole test split


def main() -> None:
    # 1. the data: every row linted, token statistics with the system prompt and chat template
    check = llm_ft.check_data(DATA, model=MODEL)
    print("train rows:", len(check.splits.train), "p95 tokens:", check.stats["train"]["tokens_p95"])

    # 2. a LoRA adapter; the options are the flags of `llm-ft train`
    steps = {"max_steps": int(STEPS), "eval_every": int(STEPS)} if STEPS else {}
    run = llm_ft.train(model=MODEL, data=DATA, out=OUT, **steps)
    print("adapter:", run.adapter_dir, "best eval loss:", run.best_eval_loss)

    # 3. scores on the test split
    scores = llm_ft.evaluate(run.run_dir, limit=int(ROWS) if ROWS else None)
    print({k: scores[k] for k in ("parse_rate", "intent_accuracy", "exact_match")})

    # 4. a GGUF and an Ollama Modelfile, checked in llama.cpp when llama-cpp-python is installed
    exported = llm_ft.export(run.run_dir, quant="q8_0", verify_prompts=2)
    print("gguf:", exported.gguf, "\nollama create quickstart -f", exported.modelfile)

    # 5. the classifier at work
    for r in llm_ft.classify(run.run_dir, ["wake me up at 6:30 tomorrow", "what's the weather in Oslo"],
                             max_new_tokens=48):
        print(repr(r.text), "->", r.intent, r.data if r.ok else r.problems)


if __name__ == "__main__":
    main()
