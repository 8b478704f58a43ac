"""Example training configs, generated from TrainConfig: ``python -m common.train.configs``.

Each file lists every option with its help text (common.config.example_yaml), with the
recipe's values filled in, so it is both a working ``-c`` file and a reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.config import example_yaml
from common.io import write_text
from common.options import DEFAULT_TARGETS, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# name -> (title, values that differ from the defaults)
EXAMPLES: dict[str, tuple[str, dict]] = {
    "unsloth-llama3": (
        "Unsloth's Llama-3 notebook recipe: LoRA r=16/alpha=16 on all seven projections, 60 steps, "
        "batch 2 x accumulation 4, AdamW 8-bit (on CUDA; AdamW elsewhere)",
        {"model": "unsloth/Llama-3.2-1B-Instruct", "backend": "torch", "max_seq_length": 2048, "max_steps": 60,
         "batch_size": 2, "grad_accum": 4, "lr": 2e-4, "warmup_steps": 5, "schedule": "linear",
         "weight_decay": 0.01, "optim": "adamw_8bit", "lora_r": 16, "lora_alpha": 16.0, "lora_dropout": 0.0,
         "targets": list(DEFAULT_TARGETS), "seed": 3407, "eval_every": 20, "save_every": 20},
    ),
    "intent-classifier-m1": (
        "The intent classifier on an M1-class Mac (MLX) or any laptop: 3 epochs, batch 2 x accumulation 8, "
        "warmup 100, evaluate every 100 steps, checkpoint every 50 (5 kept); adapter/ is the best by eval loss",
        {"model": "default", "data": ["data"], "system_prompt_file": "system_prompt.txt", "backend": "auto",
         "epochs": 3.0, "batch_size": 2, "grad_accum": 8, "lr": 2e-4, "warmup_steps": 100, "schedule": "linear",
         "lora_r": 16, "lora_alpha": 32.0, "eval_every": 100, "save_every": 50, "keep": 5,
         "max_seq_length": 512},
    ),
    "qlora-nf4": (
        "QLoRA on a CUDA GPU: 4-bit NormalFloat base with double quantisation, bf16 compute, "
        "LoRA r=16 on all projections, packed rows, paged 8-bit AdamW",
        {"model": "meta-llama/Llama-3.2-1B-Instruct", "backend": "torch", "load_in_4bit": True, "dtype": "bfloat16",
         "max_seq_length": 2048, "packing": True, "batch_size": 4, "grad_accum": 4, "epochs": 2.0, "lr": 2e-4,
         "warmup_steps": 10, "optim": "paged_adamw_8bit", "lora_r": 16, "lora_alpha": 32.0,
         "grad_checkpoint": True, "eval_every": 50, "save_every": 100},
    ),
}


def render(name: str) -> str:
    title, overrides = EXAMPLES[name]
    head = f"{title}\n# Regenerate with: python -m common.train.configs    Use with: llm-ft train -c configs/{name}.yaml"
    return example_yaml(TrainConfig, overrides, title=head)


def write_all(out_dir: Path = CONFIG_DIR) -> list[Path]:
    """Write every example to ``out_dir/<name>.yaml``; returns the paths."""
    paths = []
    for name in EXAMPLES:
        path = Path(out_dir) / f"{name}.yaml"
        write_text(path, render(name))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else CONFIG_DIR
    for p in write_all(out):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
