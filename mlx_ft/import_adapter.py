"""``llm-ft models import-adapter DIR``: an mlx-lm adapter directory -> a PEFT adapter.

The conversion itself is :func:`common.adapters.convert_mlx_lm_adapter` (numpy and
safetensors only: neither mlx nor torch is imported, so it runs on any machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.adapters import PEFT_CONFIG, PEFT_WEIGHTS, convert_mlx_lm_adapter, read_json

HELP = "convert an mlx-lm LoRA/DoRA adapter (adapters.safetensors) into a PEFT adapter"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``import-adapter`` subcommand to ``llm-ft models``' subparsers."""
    p = sub.add_parser("import-adapter", help=HELP, description=HELP + ". The PEFT adapter "
                       "(adapter_model.safetensors + adapter_config.json) is what merge, export, eval and chat read; "
                       "lora_alpha is written as scale * rank so alpha / r equals mlx-lm's scale.")
    p.add_argument("dir", metavar="DIR", help="mlx-lm adapter directory (adapters.safetensors + adapter_config.json)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: DIR-peft beside DIR)")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record "
                   "(default: the 'model' the adapter was trained on, from its adapter_config.json)")
    p.set_defaults(func=main_import_adapter)
    return p


def main_import_adapter(args: argparse.Namespace) -> int:
    """Run the conversion for parsed ``args`` (``dir``, ``out``, ``base_model``); prints what was written."""
    out = convert_mlx_lm_adapter(Path(args.dir), Path(args.out) if args.out else None,
                                 base_model=getattr(args, "base_model", None))
    cfg = read_json(out / PEFT_CONFIG)
    print(f"wrote PEFT adapter {out}/ ({PEFT_WEIGHTS}, {PEFT_CONFIG}): r={cfg['r']} lora_alpha={cfg['lora_alpha']:g} "
          f"use_dora={cfg['use_dora']} targets={','.join(cfg['target_modules'])}")
    return 0
