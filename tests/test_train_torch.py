"""The torch backend's own parts: packing masks, chunked loss, device choice, LoRA variants, QLoRA errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from common.errors import UserError  # noqa: E402
from common.options import TrainConfig  # noqa: E402
from common.rows import Conversation, Example, Text  # noqa: E402
from common.train.batching import make_batch  # noqa: E402
from torch_ft import device as devices  # noqa: E402
from torch_ft import loss as losses  # noqa: E402
from torch_ft.backend import TorchBackend  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def fmt(tiny_model_dir):
    from common.models import load_tokenizer
    from common.prompts import ChatFormatter

    return ChatFormatter(load_tokenizer(tiny_model_dir), system_prompt="You are an intent classifier.")


def chat(fmt, user: str, answer: str) -> Example:
    return fmt.encode(Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": answer}]))


def backend_for(model_dir, **kw) -> TorchBackend:
    b = TorchBackend()
    cfg = TrainConfig(model=str(model_dir), lora_r=4, lora_alpha=8.0, seed=3, **kw)
    b.setup(Path(model_dir), cfg, pad_id=0)
    return b


def move_lora_off_zero(b: TorchBackend) -> None:
    """B off zero, so the low-rank path contributes and gradients reach every layer."""
    with torch.no_grad():
        for p in b.params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)


def step_of(b: TorchBackend, batch) -> tuple[float, list[torch.Tensor]]:
    loss = b.forward_backward(batch, 1.0)
    return loss, [p.grad.clone() for p in b.params]


def assert_same_step(results, atol: float = 1e-7) -> None:
    """Two (loss, LoRA gradients) results of one step, computed two ways, agree to fp32 noise."""
    (ref, g_ref), (got, g_got) = results
    assert got == pytest.approx(ref, rel=1e-6)
    for a, c in zip(g_ref, g_got, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    b = backend_for(tiny_model_dir)
    # Move B off zero so the adapter changes the function (a fresh LoRA is the identity).
    b.forward_backward(make_batch([[Example(list(range(5, 40)), [1] * 35)]], 0), 1 / 34)
    b.optimizer_step(5e-2, 1.0)
    return b


def test_packed_rows_give_the_unpacked_loss(backend, fmt):
    a = chat(fmt, "set a timer for ten minutes", '{"intent": "set_timer"}')
    b = chat(fmt, "play some jazz", '{"intent": "play_music", "slots": {"genre": "jazz"}}')
    c = Text("The quick brown fox jumps over the lazy dog.")
    c = fmt.encode(c)
    unpacked = make_batch([[a], [b], [c]], 0)
    packed = make_batch([[a, b, c]], 0)
    mixed = make_batch([[a, c], [b]], 0)
    ref, n = backend.eval_loss(unpacked)
    for batch in (packed, mixed):
        got, m = backend.eval_loss(batch)
        assert m == n
        assert got / m == pytest.approx(ref / n, abs=1e-5)
    # The training path too (forward_backward returns the same sum).
    assert backend.forward_backward(packed, 1 / n) == pytest.approx(ref, rel=1e-5)
    backend.optimizer_step(0.0, 1.0, skip=True)


def test_flat_batch_is_the_padded_batch_without_padding(backend, fmt):
    # Guards the CUDA varlen path, which runs every multi-row batch flattened: it must be the same work.
    a = chat(fmt, "set a timer for ten minutes", '{"intent": "set_timer"}')
    b = chat(fmt, "play some jazz", '{"intent": "play_music", "slots": {"genre": "jazz"}}')
    c = fmt.encode(Text("The quick brown fox jumps over the lazy dog."))
    padded = make_batch([[a, c], [b], [c]], 0)
    flat = padded.flat()
    assert len(flat.input_ids) == 1 and len(flat.input_ids[0]) == padded.n_tokens == len(a) + len(b) + 2 * len(c)
    assert (flat.n_tokens, flat.n_supervised) == (padded.n_tokens, sum(map(sum, flat.loss_mask)))
    assert flat.segment_ids[0] == [1] * len(a) + [2] * len(c) + [3] * len(b) + [4] * len(c)
    assert flat.position_ids[0] == [*range(len(a)), *range(len(c)), *range(len(b)), *range(len(c))]
    ref, n = backend.eval_loss(padded)
    got, m = backend.eval_loss(flat)  # on the CPU: one packed row under a block-diagonal mask
    assert m == n and got == pytest.approx(ref, rel=1e-5)
    # Rounded up to a multiple (CUDA's FLAT_MULTIPLE): padding at the end, in no example, with no targets.
    rounded = padded.flat(16, pad_id=0)
    width, fill = len(rounded.input_ids[0]), len(rounded.input_ids[0]) - padded.n_tokens
    assert width % 16 == 0 and 0 < fill < 16 and (rounded.n_tokens, rounded.n_supervised) == (flat.n_tokens, flat.n_supervised)
    assert rounded.segment_ids[0] == flat.segment_ids[0] + [0] * fill and rounded.loss_mask[0][-fill:] == [0] * fill
    got, m = backend.eval_loss(rounded)
    assert m == n and got == pytest.approx(ref, rel=1e-5)


def test_autocast_lora_skips_peft_input_casts_with_the_same_numbers(tiny_model_dir, fmt):
    # Guards the dropped fp32 copy of every LoRA input under autocast: the loss and gradients must not move.
    batch = make_batch([[chat(fmt, "set a timer for ten minutes", '{"intent": "set_timer"}')],
                        [chat(fmt, "play some jazz", '{"intent": "play_music"}')]], 0)
    results = []
    for cast in (True, False):
        b = backend_for(tiny_model_dir, dtype="bfloat16")
        assert b.prec.autocast
        flags = [m for m in b.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert flags and not any(m.cast_input_dtype_enabled for m in flags)
        for m in flags:
            m.cast_input_dtype_enabled = cast
            if "forward" in vars(m):
                del m.forward  # peft's own forward, the one that casts (the lean forward never does)
        loss = b.forward_backward(batch, 1.0)
        grads = [p.grad.clone() for p in b.params if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads)
        results.append((loss, grads))
    (loss_cast, g_cast), (loss_plain, g_plain) = results
    assert loss_cast == loss_plain
    assert all(torch.equal(a, b) for a, b in zip(g_cast, g_plain, strict=True))


def test_no_attention_across_packed_examples(backend, fmt):
    a = chat(fmt, "set a timer for ten minutes", '{"intent": "set_timer"}')
    other = chat(fmt, "what's the weather in Paris tomorrow", '{"intent": "get_weather"}')
    b = chat(fmt, "play some jazz", '{"intent": "play_music"}')
    alone = backend.eval_loss(make_batch([[b]], 0))[0]
    for first in (a, other):  # whatever precedes b in the row, b's loss is its own
        packed = backend.eval_loss(make_batch([[first, b]], 0))[0]
        assert packed - backend.eval_loss(make_batch([[first]], 0))[0] == pytest.approx(alone, abs=1e-4)
    inputs = losses.model_inputs(make_batch([[a, b]], 0), torch.device("cpu"), torch.float32, "sdpa")
    mask = inputs["attention_mask"]
    assert mask.shape == (1, 1, len(a) + len(b), len(a) + len(b))
    assert (mask[0, 0, len(a):, : len(a)] < -1e30).all()  # b's queries never see a's keys
    assert (mask[0, 0, len(a):, len(a):] == 0).sum() == len(b) * (len(b) + 1) // 2  # causal inside b


def test_chunked_loss_matches_one_chunk(tiny_model_dir, fmt, monkeypatch):
    rows = [fmt.encode(Text(t)) for t in ("The quick brown fox jumps over the lazy dog. 0123456789 " * 2,
                                          "set a timer for ten minutes and play some jazz please " * 2,
                                          "user assistant system hello world thanks " * 3)]
    batch = make_batch([[r] for r in rows], 0)
    assert batch.n_supervised > 128  # more than one chunk of the smallest size
    results = []
    for budget in (losses.LOGITS_BUDGET, 1):  # 1 -> chunks of 128 positions, recomputed in backward
        monkeypatch.setattr(losses, "LOGITS_BUDGET", budget)
        b = backend_for(tiny_model_dir)
        first = b.forward_backward(batch, 1 / batch.n_supervised)
        b.optimizer_step(1e-2, 1.0)
        results.append((first, b.eval_loss(batch)[0]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)  # same gradients, same update


def test_loss_gathers_host_positions_as_the_device_mask_selects(backend, fmt):
    # Guards the sync-free gather (torch_ft.loss.target_positions): the same targets, loss and gradients.
    rows = [chat(fmt, "set a timer for ten minutes", '{"intent": "set_timer"}'),
            chat(fmt, "play some jazz", '{"intent": "play_music"}')]
    batch = make_batch([[rows[0]], [rows[1]]], 0)  # two padded rows
    mask = np.asarray(batch.loss_mask)
    picks = losses.target_positions(batch.loss_mask)
    assert len(picks) == mask[:, 1:].sum() == batch.n_supervised > 0
    width = mask.shape[1]
    assert all(mask[p // width, p % width + 1] for p in picks)
    assert losses.target_positions([]).size == 0
    inputs, loss_mask, device_picks = backend._inputs(batch)
    results = []
    for given in (None, device_picks):
        backend.model.zero_grad(set_to_none=True)
        total, n = losses.supervised_loss(backend.causal_lm, inputs, loss_mask, given)
        total.backward()
        results.append((float(total), n, [p.grad.clone() for p in backend.params if p.grad is not None]))
    assert results[1][1] == results[0][1] == batch.n_supervised
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert len(results[0][2]) == len(results[1][2]) > 0
    for a, b in zip(results[0][2], results[1][2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    backend.model.zero_grad(set_to_none=True)


def test_device_choice_on_cpu():
    p = devices.choose(None, "auto")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert (p.kind, p.dtype, p.autocast, p.grad_scaler) == ("cpu", torch.float32, False, False)
        assert "cpu" in p.description and "float32" in p.description
        with pytest.raises(UserError, match="CUDA is not available"):
            devices.choose("cuda", "auto")
    with pytest.raises(UserError, match="float16"):
        devices.choose("cpu", "float16")


def test_qlora_without_a_gpu_names_the_alternatives(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError) as err:
        backend_for(tiny_model_dir, load_in_4bit=True)
    text = err.value.render()
    assert "--load-in-4bit" in text and "--backend mlx" in text and "cpu" in text


def test_dora_rslora_on_the_last_layer(tiny_model_dir, tmp_path):
    b = backend_for(tiny_model_dir, use_dora=True, use_rslora=True, num_layers=1, targets=["q_proj", "v_proj", "nope"])
    batch = make_batch([[Example(list(range(5, 30)), [1] * 25)]], 0)
    before = b.eval_loss(batch)[0]
    for _ in range(3):
        b.forward_backward(batch, 1 / 24)
        assert b.optimizer_step(1e-2, 1.0).finite
    assert b.eval_loss(batch)[0] < before
    b.save_adapter(tmp_path, "base")
    from safetensors.numpy import load_file

    keys = list(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all(".layers.1." in k for k in keys)  # only the last of 2 layers
    assert any("lora_magnitude_vector" in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_unknown_targets_list_what_exists(tiny_model_dir):
    with pytest.raises(UserError) as err:
        backend_for(tiny_model_dir, targets=["qkv"])
    assert "q_proj" in err.value.render() and "down_proj" in err.value.render()


def test_eight_bit_optimizer_falls_back_on_cpu(tiny_model_dir):
    b = TorchBackend()
    info = b.setup(Path(tiny_model_dir), TrainConfig(model=str(tiny_model_dir), optim="adamw_8bit"), 0)
    if not torch.cuda.is_available():
        assert any("using adamw" in n for n in info.notes)
        assert type(b.optimizer).__name__ == "AdamW"


def test_nested_optimizer_state_round_trips(tmp_path):
    # Regression: bitsandbytes' 8-bit optimizers nest their state in a dict; saving crashed on the H100.
    from torch_ft import state as states

    class Nested(torch.optim.AdamW):  # the shape of bitsandbytes' state_dict, on plain AdamW
        def state_dict(self):
            sd = super().state_dict()
            sd["state"] = {k: {"step": v["step"], "quant": {"exp_avg": v["exp_avg"], "exp_avg_sq": v["exp_avg_sq"]},
                               "bits": 8} for k, v in sd["state"].items()}
            return sd

        def load_state_dict(self, sd):
            for v in sd["state"].values():
                v.update(v.pop("quant"))
                assert v.pop("bits") == 8
            super().load_state_dict(sd)

    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = Nested([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    states.save_optimizer(opt, None, tmp_path)
    q = torch.nn.Parameter(p.detach().clone())
    again = Nested([q], lr=0.1)
    assert states.load_optimizer(again, None, tmp_path, allow_partial=False)
    assert torch.equal(again.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    assert float(again.state[q]["step"]) == 1.0


def test_segment_bounds_cover_every_token_of_the_flattened_batch():
    from torch_ft.attention import segment_bounds

    batch = make_batch([[Example([5] * 3, [1] * 3), Example([6] * 4, [1] * 4)], [Example([7] * 2, [1] * 2)]], 0)
    bounds, longest = segment_bounds(batch.segment_ids)
    # row 0: examples of 3 and 4 tokens; row 1: one of 2 tokens, then 5 padding tokens as a segment of their own
    assert bounds == [0, 3, 7, 9, 14] and longest == 5
    assert segment_bounds([[1, 1, 1]]) == ([0, 3], 3)


def test_varlen_attention_liger_and_compile_refuse_the_cpu_with_the_reason(tiny_model_dir):
    with pytest.raises(UserError, match="--attention varlen: needs an NVIDIA GPU"):
        backend_for(tiny_model_dir, attention="varlen")
    with pytest.raises(UserError, match="--kernels liger: needs an NVIDIA GPU"):
        backend_for(tiny_model_dir, kernels="liger")
    with pytest.raises(UserError, match="--compile on: needs an NVIDIA GPU"):
        backend_for(tiny_model_dir, compile="on")
    assert backend_for(tiny_model_dir, compile="auto").model is not None  # auto: nothing to compile here


def test_varlen_implementation_falls_through_to_sdpa_without_segments(tiny_model_dir):
    # Generation and sliding-window layers reach the registered attention without segment bounds:
    # they must get exactly SDPA's answer, masks included (padded batch).
    from transformers import AutoModelForCausalLM

    from torch_ft import attention

    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = {}
    for impl in ("sdpa", attention.register()):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=impl)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            out[impl] = model(input_ids=ids, attention_mask=mask).logits
    a, b = out.values()
    assert torch.equal(a, b)


def test_cpu_batches_run_in_row_groups_with_the_same_gradients(tiny_model_dir):
    # On the CPU a batch wider than CPU_TOKENS_PER_PASS runs in row groups (less activation memory);
    # the summed loss and the update must equal one pass over the whole batch.
    from torch_ft import plan as plans

    rows = [[Example(list(range(5 + k, 5 + k + n)), [0] * 3 + [1] * (n - 3))] for k, n in enumerate((70, 52, 66, 9))]
    batch = make_batch(rows, 0)
    width = len(batch.input_ids[0])
    per = plans.rows_per_pass(4, width, "cpu")
    assert per == max(1, plans.CPU_TOKENS_PER_PASS // width) < 4
    assert plans.rows_per_pass(4, width, "cuda") == 4
    part = batch.rows(3, 4)
    assert len(part.input_ids[0]) == 9 and part.n_tokens == 9 and part.n_supervised == 6  # trimmed to its row
    results = []
    default = plans.CPU_TOKENS_PER_PASS
    for budget in (default, 10**6):
        plans.CPU_TOKENS_PER_PASS = budget
        try:
            b = backend_for(tiny_model_dir)
            assert len(b._passes(batch)) == (-(-4 // per) if budget == default else 1)
            loss = b.forward_backward(batch, 1 / batch.n_supervised)
            b.optimizer_step(1e-2, 1.0)
            results.append((loss, b.eval_loss(batch)[0]))
        finally:
            plans.CPU_TOKENS_PER_PASS = default
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lean_lora_forward_is_peft_forward(tiny_model_dir, use_dora, monkeypatch):
    # Guards torch_ft.lora_forward: the same outputs and LoRA gradients as peft's own forward (DoRA: peft's path).
    from torch_ft import lora_forward

    lean_calls = []
    real = lora_forward._lean_forward
    monkeypatch.setattr(lora_forward, "_lean_forward", lambda *a, **k: lean_calls.append(1) or real(*a, **k))
    batch = make_batch([[Example(list(range(5, 30)), [0] * 5 + [1] * 20)], [Example(list(range(40, 52)), [1] * 12)]], 0)
    results = []
    for lean in (False, True):
        b = backend_for(tiny_model_dir, use_dora=use_dora)
        move_lora_off_zero(b)
        layers = [m for m in b.model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
        assert layers  # the backend installed the lean forward on every LoRA layer
        if not lean:
            for m in layers:
                del m.forward  # peft's own forward again
        lean_calls.clear()
        results.append(step_of(b, batch))
        assert bool(lean_calls) == lean
    assert_same_step(results, atol=1e-6)  # grouped q/k/v and gate/up (SharedInput) sum input gradients in another order


def test_cpu_recomputes_some_layers_with_the_same_gradients(tiny_model_dir):
    # Guards the CPU's partial gradient checkpointing: fewer kept activations, not a different step.
    from torch_ft import plan as plans

    batch = make_batch([[Example(list(range(5, 40)), [0] * 5 + [1] * 30)], [Example(list(range(50, 70)), [1] * 20)]], 0)
    results = []
    for recompute in (True, False):
        b = backend_for(tiny_model_dir)
        layers = b.causal_lm.get_decoder().layers
        expected = [i % plans.CPU_RECOMPUTE_EVERY == 0 for i in range(len(layers))]
        assert [bool(m.gradient_checkpointing) for m in layers] == expected and any(expected)
        if not recompute:
            for m in layers:
                m.gradient_checkpointing = False
        results.append(step_of(b, batch))
    assert_same_step(results, atol=1e-8)


def test_native_fused_rms_norm_is_the_transformers_norm(tiny_model_dir):
    # Guards torch_ft.kernels' fused RMSNorm (--kernels native; auto on CUDA below Liger's size):
    # the same loss and LoRA gradients as transformers' own norms, and every norm patched.
    from torch_ft import kernels

    batch = make_batch([[Example(list(range(5, 40)), [0] * 5 + [1] * 30)], [Example(list(range(50, 70)), [1] * 20)]], 0)
    results = []
    for choice in ("off", "native"):
        b = backend_for(tiny_model_dir, kernels=choice)
        norms = [m for m in b.causal_lm.modules() if type(m).__name__ in kernels.LLAMA_RMSNORMS]
        assert norms and all(("forward" in vars(m)) == (choice == "native") for m in norms)
        move_lora_off_zero(b)
        results.append(step_of(b, batch))
    assert_same_step(results)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "smollm3", "gemma", "olmo2"])
def test_fused_rms_norm_only_where_the_forward_is_llamas(arch):
    # The class list is by name: each listed class must compute Llama's norm (bf16 in, within one
    # bf16 rounding); Gemma's (1 + weight) and OLMo 2's norms differ and must not be listed.
    import importlib

    from torch_ft import kernels

    mod = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    cls = next(getattr(mod, n) for n in dir(mod) if n.lower() == f"{arch}rmsnorm")
    norm = cls(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    ref = norm(x)
    assert kernels.fuse_rms_norms(torch.nn.Sequential(norm)) == (cls.__name__ in kernels.LLAMA_RMSNORMS)
    if cls.__name__ in kernels.LLAMA_RMSNORMS:
        got = norm(x)
        assert got.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-2)
    else:
        assert arch in ("gemma", "olmo2")
