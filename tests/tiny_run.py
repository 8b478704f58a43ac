"""A small copy of the shipped data and a tiny run trained on it through the Python API.

Shared by the API, push, tracker and example tests: a few steps on the 2-layer model of
tests/tiny.py, so a whole run (config.json, adapter/, metrics.jsonl, summary.json) costs
seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def copy_data(dest: Path, train: int = 16, valid: int = 4, test: int = 4) -> Path:
    """``dest`` with the first rows of data/{train,valid,test}.jsonl, schema.json, and
    system_prompt.txt one folder up (as data/README.md says: ../system_prompt.txt)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("valid", valid), ("test", test)):
        if n:
            lines = (REPO / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
            (dest / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(REPO / "data" / "schema.json", dest / "schema.json")
    shutil.copy(REPO / "system_prompt.txt", dest.parent / "system_prompt.txt")
    return dest


TRAIN_OPTIONS = dict(max_steps=2, batch_size=2, eval_every=0, save_every=0, lora_r=4, sample_prompts=0,
                     max_seq_length=256, backend="torch")


def train_tiny(model_dir: Path, data: Path, out: Path, **options):
    """llm_ft.train on the tiny model with the options above (overridable); returns the TrainResult."""
    import llm_ft

    return llm_ft.train(model=str(model_dir), data=[str(data)], out=str(out), **{**TRAIN_OPTIONS, **options})
