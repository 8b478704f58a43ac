"""``llm-ft models import-adapter DIR``: an mlx-lm adapter directory -> a PEFT adapter.

The command's config and body live in :mod:`common.adapters` (numpy and safetensors
only: neither mlx nor torch is imported, so it runs on any machine), which writes
through :mod:`common.peft`;
``common/models/cmd.py`` lists it among the ``models`` actions. This module is the
entry point named for the MLX side.
"""

from __future__ import annotations

import argparse

from common.adapters import ModelsImportAdapterConfig, convert_mlx_lm_adapter, run_import_adapter

__all__ = ["ModelsImportAdapterConfig", "convert_mlx_lm_adapter", "main_import_adapter", "run_import_adapter"]


def main_import_adapter(args: argparse.Namespace) -> int:
    """Run the conversion for parsed ``args`` (``dir``, and optional ``out``, ``base_model``)."""
    cfg = ModelsImportAdapterConfig(dir=str(args.dir), out=getattr(args, "out", None),
                                    base_model=getattr(args, "base_model", None))
    return run_import_adapter(cfg)
