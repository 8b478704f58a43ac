"""The one contract every registered backend passes (common.backends.REGISTRY), on the tiny model.

Backend-agnostic: it uses only the registry and the Protocol (common.train.backend.Backend),
plus transformers + peft as the outside judge of the PEFT files a backend writes. A new
registry line is tested here without a line of this file changing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.backends import REGISTRY, DevicePlan, device_plan, engine_class, load_backend
from common.generation import Generator
from common.options import TrainConfig
from common.train.backend import Backend, BackendInfo, StepStats
from common.train.batching import make_batch

# peft asks transformers a deprecated question when it wraps a model; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

STEPS = 4
LR = 1e-2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: the model is tiny and the test machine's cores are shared (threads would spin)."""
    import os
    import sys

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if old is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, os.cpu_count() or 1))


def make(name: str):
    pytest.importorskip(REGISTRY[name].framework, reason=f"the {name} backend's framework is not installed")
    pytest.importorskip("peft")  # the outside judge
    backend = load_backend(name)
    assert isinstance(backend, Backend) and backend.name == name
    return backend


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    from common.models import load_tokenizer
    from common.prompts import ChatFormatter
    from common.rows import Conversation

    tok = load_tokenizer(tiny_model_dir)
    fmt = ChatFormatter(tok, system_prompt="You are an intent classifier.")
    rows = [("set a timer for ten minutes", '{"intent": "set_timer"}'), ("play some jazz", '{"intent": "play_music"}'),
            ("hello world", '{"intent": "unknown", "slots": {}}')]
    convs = [Conversation([{"role": "user", "content": u}, {"role": "assistant", "content": a}]) for u, a in rows]
    return tok, fmt, [fmt.encode(c) for c in convs], convs


def cfg_for(model_dir) -> TrainConfig:
    return TrainConfig(model=str(model_dir), lora_r=4, lora_alpha=8.0, seed=1, dtype="float32", device="cpu")


def new_backend(name, model_dir, tok):
    backend = make(name)
    info = backend.setup(Path(model_dir), cfg_for(model_dir), tok.pad_token_id)
    assert isinstance(info, BackendInfo)
    return backend, info


def train(backend, batch, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(backend.forward_backward(batch, 1.0 / batch.n_supervised) / batch.n_supervised)
        stats = backend.optimizer_step(LR, 1.0)
        assert isinstance(stats, StepStats) and stats.finite and not stats.skipped
    return losses


def peft_mean_loss(model_dir: Path, adapter_dir: Path, examples) -> float:
    """Mean target-token loss of base + adapter as transformers + peft compute it (the outside judge)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            target = ids[0, 1:]
            mask = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
            total += float(-logp[torch.arange(len(target)), target][mask].sum())
            count += int(mask.sum())
    return total / count


@pytest.fixture(params=sorted(REGISTRY))
def name(request):
    return request.param


def test_registry_line_names_an_engine_and_a_device_plan(name):
    pytest.importorskip(REGISTRY[name].framework, reason=f"the {name} backend's framework is not installed")
    engine = engine_class(name)
    assert issubclass(engine, Generator) and engine.backend == name and callable(engine.load)
    cpu = device_plan(name, "cpu", "auto")  # the CPU trains in fp32 on every backend
    assert isinstance(cpu, DevicePlan) and cpu.backend == name and cpu.dtype_bytes == 4
    assert cpu.overhead_bytes > 0 and cpu.slack >= 1 and 0 < cpu.quant_bytes < 1
    assert device_plan(name, "cpu", "bfloat16").dtype_bytes == 2
    assert 1 <= cpu.rows_per_pass(4, 100) <= 4


def test_backend_contract(name, tiny_model_dir, examples, tmp_path):
    tok, fmt, exs, convs = examples
    backend, info = new_backend(name, tiny_model_dir, tok)
    assert info.trainable_params > 0 and info.total_params > info.trainable_params
    assert set(info.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    batch = make_batch([[e] for e in exs], tok.pad_token_id)

    # eval_loss is the forward loss: same sum, same count, no update.
    s0, n0 = backend.eval_loss(batch)
    assert n0 == batch.n_supervised
    fwd = backend.forward_backward(batch, 1.0 / batch.n_supervised)
    assert fwd == pytest.approx(s0, rel=1e-5)
    assert backend.optimizer_step(LR, 1.0, skip=True).skipped
    assert backend.eval_loss(batch)[0] == pytest.approx(s0, rel=1e-6)

    # Training lowers the loss.
    train(backend, batch, STEPS)
    s1, _ = backend.eval_loss(batch)
    assert s1 < 0.95 * s0

    # Greedy generation returns new ids and stops before the first stop id.
    prompt = fmt.prompt_ids(convs[0].messages[:1])
    free = backend.generate(prompt, 12, [])
    assert 0 < len(free) <= 12 and all(isinstance(t, int) for t in free)
    stop = free[3]
    first = free.index(stop)
    assert backend.generate(prompt, 12, [stop]) == free[:first]

    # save_adapter writes PEFT's two files, which peft loads to the same loss.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    backend.save_adapter(adapter, str(tiny_model_dir))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 4
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 8
    pytest.importorskip("peft")
    assert peft_mean_loss(tiny_model_dir, adapter, exs) == pytest.approx(s1 / batch.n_supervised, rel=1e-4)

    # load_adapter round-trips into a fresh backend.
    state = tmp_path / "state"
    state.mkdir()
    written = backend.save_state(state)
    assert written and all((state / f).exists() for f in written)
    assert not list(state.glob("*.pt")) and not list(state.glob("*.pkl")) and not list(state.glob("*.bin"))
    fresh, _ = new_backend(name, tiny_model_dir, tok)
    fresh.load_adapter(adapter)
    assert fresh.eval_loss(batch)[0] == pytest.approx(s1, rel=1e-6)

    # save_state/load_state: the restored backend continues exactly as the original does.
    fresh.load_state(state)
    ahead = train(backend, batch, 3)
    again = train(fresh, batch, 3)
    assert again == pytest.approx(ahead, rel=1e-6)
    assert all(math.isfinite(x) for x in again)
    assert fresh.eval_loss(batch)[0] == pytest.approx(backend.eval_loss(batch)[0], rel=1e-6)


@pytest.mark.parametrize("apple, have, prefer, want", [
    (True, {"torch", "mlx"}, None, "mlx"),  # Apple Silicon with MLX installed
    (False, {"torch", "mlx"}, None, "torch"),
    (False, {"torch", "mlx"}, "mlx", "mlx"),  # a run's own backend, when installed
    (True, {"torch"}, "mlx", "torch"),
    (False, {"mlx"}, None, "mlx"),  # the only one installed
    (False, set(), None, "torch"),  # none: torch, whose loading says what to install
])
def test_auto_resolves_to_an_installed_backend(monkeypatch, apple, have, prefer, want):
    # Guards the one auto rule shared by train and the inference engines (they had two selectors).
    from common import backends

    monkeypatch.setattr(backends, "is_apple_silicon", lambda: apple)
    monkeypatch.setattr(backends, "installed", lambda n: n in have)
    assert backends.resolve("auto", prefer=prefer) == want
    assert backends.resolve("mlx", prefer="torch") == "mlx"  # an explicit choice is kept
