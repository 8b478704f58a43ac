"""Glue shared by subcommands: parse flags into a config, then run it."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from common import config
from common.cli import run_command


def make_parser(prog: str, description: str, cfg_cls=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"llm-ft {prog}", description=description)
    if cfg_cls is not None:
        config.add_arguments(parser, cfg_cls)
    config.add_config_arguments(parser)
    return parser


def main_for(build_parser: Callable[[], argparse.ArgumentParser], cfg_cls, run: Callable,
             argv: Sequence[str] | None, extra: Callable[[argparse.Namespace, object], int | None] | None = None) -> int:
    """Parse ``argv`` with ``build_parser``, resolve ``cfg_cls`` and call ``run(cfg)``."""
    args = build_parser().parse_args(argv)

    def body():
        cfg = config.from_args(cfg_cls, args)
        if extra is not None:
            handled = extra(args, cfg)
            if handled is not None:
                return handled
        return run(cfg)

    return run_command(body, getattr(args, "debug", False))
