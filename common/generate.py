"""Generation from runs, models and GGUF files: see :mod:`common.generation` (this is its short name)."""

from common.generation import Generator, Target, load_generator, resolve_target

__all__ = ["Generator", "Target", "load_generator", "resolve_target"]
