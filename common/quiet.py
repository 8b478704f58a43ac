"""Keep the libraries' own chatter out of the user's terminal unless ``--verbose``.

What a newcomer saw on every torch command: bitsandbytes' "Failed to load CPU
gemm_4bit_forward from kernels-community" line, tqdm bars from huggingface_hub and
datasets, and FutureWarnings from transformers/peft about their own internals. None of
it concerns the user's run. ``--verbose`` shows it all again.

Also: outside a terminal (CI logs, ``nohup``, a pipe) rich would wrap every line at 80
columns; a log line is kept whole instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Loggers of libraries we call, set to ERROR: their warnings are about themselves.
LIBRARY_LOGGERS = ("bitsandbytes", "transformers", "peft", "datasets", "huggingface_hub", "accelerate", "torch",
                   "torchao", "mlx", "mlx_lm", "jax", "absl", "wandb", "urllib3", "filelock", "httpx")
# Environment switches the libraries read at import: progress bars and advisory messages off.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "BITSANDBYTES_NOWELCOME": "1", "WANDB_SILENT": "true", "DATASETS_VERBOSITY": "error"}
LOG_COLUMNS = 1000  # rich's width when not writing to a terminal: never wrap a log line


def wants_verbose(argv: list[str]) -> bool:
    return "--verbose" in argv


def setup(verbose: bool) -> None:
    """Call once, before the libraries are imported. The user's own environment always wins."""
    if not sys.stderr.isatty():  # the log goes to a file or a pipe (a terminal keeps its own width)
        os.environ.setdefault("COLUMNS", str(LOG_COLUMNS))
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
