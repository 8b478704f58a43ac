"""Memory modes (--memory-mode default|checkpoint|offload) and the --max-memory budget that picks one.

On the CPU there is no device memory to offload from: offload's hooks keep each saved layer
input where it is, but they and the recompute run, so the losses and gradients are checked
against training without recomputation on the tiny model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.backends import device_plan
from common.models import memory
from common.options import TrainConfig, memory_mode

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

STEPS = 4
LR = 1e-2


def _examples(model_dir):
    from common.models import load_tokenizer
    from common.prompts import ChatFormatter
    from common.rows import Conversation

    tok = load_tokenizer(model_dir)
    fmt = ChatFormatter(tok, system_prompt="You are an intent classifier.")
    rows = [("set a timer for ten minutes", '{"intent": "set_timer"}'), ("play some jazz", '{"intent": "play_music"}'),
            ("hello world", '{"intent": "unknown", "slots": {}}')]
    convs = [Conversation([{"role": "user", "content": u}, {"role": "assistant", "content": a}]) for u, a in rows]
    return tok, [fmt.encode(c) for c in convs]


def _train(model_dir, mode: str):
    """Per-step losses, the first step's LoRA gradients, and the backend of STEPS steps in ``mode``."""
    from common.backends import load_backend
    from common.train.batching import make_batch

    tok, exs = _examples(model_dir)
    cfg = TrainConfig(model=str(model_dir), lora_r=4, lora_alpha=8.0, seed=1, dtype="float32", device="cpu",
                      memory_mode=mode)
    backend = load_backend("torch")
    backend.setup(Path(model_dir), cfg, tok.pad_token_id)
    batch = make_batch([[e] for e in exs], tok.pad_token_id)
    losses, grads = [], None
    for _ in range(STEPS):
        losses.append(backend.forward_backward(batch, 1.0 / batch.n_supervised) / batch.n_supervised)
        if grads is None:
            grads = [p.grad.detach().clone() for p in backend.params]
        backend.optimizer_step(LR, 1.0)
    return losses, grads, backend


def _layers(backend):
    return list(backend.causal_lm.get_decoder().layers)


def test_offload_mode_trains_as_without_recompute(tiny_model_dir, one_torch_thread):
    # Guards: reentrant checkpointing silently gives no gradient to a layer whose input does not require grad.
    import torch

    plain_losses, plain_grads, plain = _train(tiny_model_dir, "default")
    assert any(not layer.gradient_checkpointing for layer in _layers(plain))  # CPU default: 1 layer in 6 recomputed
    off_losses, off_grads, off = _train(tiny_model_dir, "offload")
    layers = _layers(off)
    assert all(layer.gradient_checkpointing for layer in layers)
    hooks = layers[0]._gradient_checkpointing_func.args[0]
    assert hooks.packed >= STEPS * len(layers)  # every layer's input went through the offload hooks each step
    assert hooks.offloaded_bytes == 0  # on the CPU nothing moves
    assert off_losses == pytest.approx(plain_losses, rel=1e-5)
    assert plain_losses[-1] < plain_losses[0]
    assert len(off_grads) == len(plain_grads)
    for a, b in zip(off_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in off_grads) > 0

    ck_losses, _, _ = _train(tiny_model_dir, "checkpoint")
    assert ck_losses == pytest.approx(plain_losses, rel=1e-5)


def test_memory_mode_from_flags():
    assert memory_mode(TrainConfig()) == "default"
    assert memory_mode(TrainConfig(grad_checkpoint=True)) == "checkpoint"
    assert memory_mode(TrainConfig(memory_mode="offload")) == "offload"
    assert any("choose one" in p for p in TrainConfig(grad_checkpoint=True, memory_mode="default").validate())
    assert any("max_memory" in p for p in TrainConfig(max_memory="lots").validate())


@pytest.mark.parametrize("text,expected", [("16GB", 16 * 10**9), ("16GiB", 16 << 30), ("12000MB", 12 * 10**9),
                                           ("1.5 GiB", 3 << 29), ("512mib", 512 << 20)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["16XB", "GB", "-1GB", "0GB", "", "16 GB extra"])
def test_parse_size_refuses_with_the_flag_name(text):
    with pytest.raises(ValueError, match="max_memory: expected a size such as 16GB"):
        memory.parse_size(text)


LLAMA_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "tie_word_embeddings": False}


def _cuda_plan():
    from common.backends import DevicePlan

    cpu = device_plan("torch", "cpu", "bfloat16")
    fields = {k: getattr(cpu, k) for k in cpu.__dataclass_fields__}
    return DevicePlan(**{**fields, "device": "cuda", "overhead_bytes": 600 << 20, "slack": 1.15,
                         "device_memory": (140 << 30, "a GPU: 140 GiB free"), "tokens_per_pass": None,
                         "unified_memory": False, "can_quantize": True})


KW = dict(load_in_4bit=False, lora_r=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"], batch_size=1, seq_len=4096, num_layers=None)


def test_budget_picks_the_fastest_mode_that_fits():
    plan = _cuda_plan()
    table = dict(memory.mode_table(LLAMA_8B, plan=plan, **KW))
    assert table["default"].total_bytes > table["checkpoint"].total_bytes > table["offload"].total_bytes
    for want in ("default", "checkpoint", "offload"):
        budget = table[want].total_bytes + (1 << 20)
        mode, line = memory.choose_mode(LLAMA_8B, budget=budget, plan=plan, **KW)
        assert mode == want and line.startswith(f"memory mode {want}: about ")
    mode, line = memory.choose_mode(LLAMA_8B, budget=table["checkpoint"].total_bytes + (1 << 20), plan=plan, **KW)
    assert "default needs" in line
    # on the CPU offload saves nothing, so it is never the pick
    cpu = device_plan("torch", "cpu", "bfloat16")
    assert [m for m, _ in memory.mode_table(LLAMA_8B, plan=cpu, **KW)] == ["default", "checkpoint"]


def test_budget_no_mode_fits_lists_the_fixes():
    from common.errors import UserError

    plan = _cuda_plan()
    with pytest.raises(UserError) as err:
        memory.choose_mode(LLAMA_8B, budget=12 * 10**9, plan=plan, **{**KW, "batch_size": 4})
    assert "even in memory mode offload" in err.value.message
    fixes = [p for p in err.value.problems if p.startswith("would fit with --memory-mode offload and ")]
    assert fixes and all(p.endswith("GiB") for p in fixes), err.value.problems


def test_unsloth_offloaded_checkpointing_name_hints_offload():
    from common.command import flag_hint

    known = ["--memory-mode", "--grad-checkpoint"]
    assert flag_hint("--use_gradient_checkpointing", known, "unsloth") == "--memory-mode offload"
    assert flag_hint('--use_gradient_checkpointing="unsloth"', known) == "--memory-mode offload"
    assert flag_hint("--use_gradient_checkpointing", known, "true") == "--grad-checkpoint"
