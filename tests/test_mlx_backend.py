"""The MLX backend on the tiny model: what it receives, packing, accumulation, the compiled
step, skips, resume, generation, quantised bases, checkpointing, LoRA init and targets."""

from __future__ import annotations

import numpy as np
import pytest
from test_mlx_support import adapter_arrays, batches, examples, mlx_backend, randomize_b

from common.errors import UserError
from common.train.batching import make_batch

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_flatten  # noqa: E402

from mlx_ft.lora import lora_layers  # noqa: E402


def params(backend) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())}


def run_steps(backend, micro, steps: int, lr: float = 1e-2) -> list[float]:
    total = sum(b.n_supervised for b in micro)
    losses = []
    for _ in range(steps):
        losses.append(sum(backend.forward_backward(b, 1.0 / total) for b in micro))
        assert backend.optimizer_step(lr, 1.0).finite
    return losses


def test_the_lists_from_prompts_reach_mlx_unchanged(tiny_model_dir):
    from transformers import AutoTokenizer

    from common.prompts import ChatFormatter
    from common.rows import Conversation

    fmt = ChatFormatter(AutoTokenizer.from_pretrained(str(tiny_model_dir)), system_prompt="You are an intent classifier.")
    rows = [Conversation([{"role": "user", "content": "play some jazz"},
                          {"role": "assistant", "content": '{"intent": "play_music"}'}]),
            Conversation([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "{}"}])]
    exs = [fmt.encode(r) for r in rows]
    backend = mlx_backend(tiny_model_dir)
    for batch in (make_batch([[exs[0]], [exs[1]]], 0), make_batch([[exs[0], exs[1]]], 0)):
        backend.forward_backward(batch, 1.0)
        got = {k: np.array(v).tolist() for k, v in backend.received.items()}
        assert got == {"input_ids": batch.input_ids, "loss_mask": batch.loss_mask,
                       "segment_ids": batch.segment_ids, "position_ids": batch.position_ids}
        _, count = backend.eval_loss(batch)
        assert count == batch.n_supervised
    # and the batch rows are the encoder's lists (the first token of an example is never a target)
    assert got["input_ids"][0] == exs[0].input_ids + exs[1].input_ids
    assert got["loss_mask"][0] == [0] + exs[0].loss_mask[1:] + [0] + exs[1].loss_mask[1:]
    backend.optimizer_step(1e-3, 1.0)


def test_packed_row_equals_separate_rows(tiny_model_dir):
    backend = mlx_backend(tiny_model_dir)
    randomize_b(backend)
    exs = examples(lengths=(11, 6, 8))
    separate = make_batch([[e] for e in exs], 0)
    packed = make_batch([exs], 0)
    loss_sep = backend.forward_backward(separate, 1.0)
    grads_sep = {k: np.array(v) for k, v in tree_flatten(backend._grads)}
    backend.optimizer_step(0.0, 0.0, skip=True)
    loss_packed = backend.forward_backward(packed, 1.0)
    grads_packed = dict(tree_flatten(backend._grads))
    assert loss_packed == pytest.approx(loss_sep, rel=1e-5)
    for k, g in grads_sep.items():
        np.testing.assert_allclose(np.array(grads_packed[k]), g, atol=1e-5, err_msg=k)
    assert backend.eval_loss(packed)[0] == pytest.approx(backend.eval_loss(separate)[0], rel=1e-5)


def test_accumulated_compiled_step_equals_one_big_uncompiled_step(tiny_model_dir):
    exs = examples()
    micro = batches(exs)
    whole = make_batch([[e] for e in exs], 0)
    a = mlx_backend(tiny_model_dir, compile=True)
    b = mlx_backend(tiny_model_dir, compile=False)
    randomize_b(a)
    randomize_b(b)
    for _ in range(3):
        la = sum(a.forward_backward(m, 1.0 / whole.n_supervised) for m in micro)
        lb = b.forward_backward(whole, 1.0 / whole.n_supervised)
        sa, sb = a.optimizer_step(1e-2, 1.0), b.optimizer_step(1e-2, 1.0)
        assert la == pytest.approx(lb, rel=1e-5) and sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-4)
    pa, pb = params(a), params(b)
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=2e-5, err_msg=k)  # Adam magnifies fp32 noise on tiny gradients
    assert int(a.optimizer.state["step"]) == 3


def test_skip_and_nonfinite_leave_the_adapter_alone(tiny_model_dir, tmp_path):
    backend = mlx_backend(tiny_model_dir)
    micro = batches(examples())
    before = params(backend)
    backend.forward_backward(micro[0], 0.1)
    stats = backend.optimizer_step(1e-2, 1.0, skip=True)
    assert stats.skipped and stats.finite
    assert all(np.array_equal(before[k], v) for k, v in params(backend).items())
    assert int(backend.optimizer.state["step"]) == 0
    # gradients were dropped: the next step sees only its own batch
    run_steps(backend, micro[:1], 1)
    fresh = mlx_backend(tiny_model_dir)
    run_steps(fresh, micro[:1], 1)
    assert all(np.allclose(params(fresh)[k], v, atol=1e-7) for k, v in params(backend).items())

    layer = next(iter(lora_layers(backend.model).values()))
    layer.lora_b = layer.lora_b * float("nan")
    backend._build_steps()
    poisoned = params(backend)
    assert np.isnan(backend.forward_backward(micro[0], 0.1))
    stats = backend.optimizer_step(1e-2, 1.0)
    assert (stats.finite, stats.skipped) == (False, True)
    after = params(backend)
    assert all(np.array_equal(poisoned[k], v, equal_nan=True) for k, v in after.items())
    with pytest.raises(ValueError, match="non-finite"):
        backend.save_adapter(tmp_path, "tiny")


def test_resume_is_bitwise_with_dropout(tiny_model_dir, tmp_path):
    micro = batches(examples())
    straight = mlx_backend(tiny_model_dir, lora_dropout=0.2)
    run_steps(straight, micro, 4)

    first = mlx_backend(tiny_model_dir, lora_dropout=0.2)
    run_steps(first, micro, 2)
    first.save_adapter(tmp_path, "tiny")
    names = first.save_state(tmp_path)
    assert sorted(names) == ["mlx_optimizer.safetensors", "mlx_rng.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["adapter_config.json",
                                                                         "adapter_model.safetensors"])
    resumed = mlx_backend(tiny_model_dir, lora_dropout=0.2, seed=99)  # seed and init come from the checkpoint
    resumed.load_adapter(tmp_path)
    resumed.load_state(tmp_path)
    run_steps(resumed, micro, 2)
    a, b = params(straight), params(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    # dropout really drew masks: a run without it ends elsewhere
    plain = mlx_backend(tiny_model_dir)
    run_steps(plain, micro, 4)
    assert not all(np.array_equal(a[k], v) for k, v in params(plain).items())


def test_load_state_needs_the_optimizer_unless_partial(tiny_model_dir, tmp_path):
    backend = mlx_backend(tiny_model_dir)
    with pytest.raises(UserError, match="no MLX optimizer state"):
        backend.load_state(tmp_path)
    backend.load_state(tmp_path, allow_partial=True)
    other = mlx_backend(tiny_model_dir, targets=["q_proj"])
    other.save_state(tmp_path)
    with pytest.raises(UserError, match="does not fit this adapter") as err:
        backend.load_state(tmp_path)
    assert any("model.layers.0.mlp.up_proj.lora_a.m: missing" in p for p in err.value.problems)


def test_generate_is_greedy_and_stops_before_the_stop_id(tiny_model_dir):
    backend = mlx_backend(tiny_model_dir)
    randomize_b(backend, std=0.3)
    prompt = [1, 40, 41, 42]
    ids, want = list(prompt), []
    for _ in range(6):  # the reference: argmax of full forward passes
        nxt = int(np.argmax(np.array(backend.logits([ids]))[0, -1]))
        want.append(nxt)
        ids.append(nxt)
    assert backend.generate(prompt, 6, []) == want
    stop = want[2]
    cut = want.index(stop)
    assert backend.generate(prompt, 6, [stop]) == want[:cut]


@pytest.mark.parametrize("bits,dora", [(4, False), (8, True)])
def test_quantized_base_trains(tiny_model_dir, tmp_path, bits, dora):
    import mlx.nn as nn

    backend = mlx_backend(tiny_model_dir, **{f"load_in_{bits}bit": True, "use_dora": dora})
    layers = lora_layers(backend.model)
    assert layers and all(isinstance(m.linear, nn.QuantizedLinear) and m.linear.bits == bits for m in layers.values())
    assert any(f"{bits}-bit" in n for n in backend.info.notes)
    assert backend.info.total_params == mlx_backend(tiny_model_dir, use_dora=dora).info.total_params  # unpacked
    losses = run_steps(backend, batches(examples()), 4, lr=3e-2)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    backend.save_adapter(tmp_path, "tiny")
    shapes = {k: v.shape for k, v in adapter_arrays(tmp_path).items()}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (4, 128)  # unpacked in-features


def test_grad_checkpoint_gives_the_same_training(tiny_model_dir):
    micro = batches(examples())
    plain = mlx_backend(tiny_model_dir)
    ckpt = mlx_backend(tiny_model_dir, grad_checkpoint=True)
    assert run_steps(plain, micro, 2) == pytest.approx(run_steps(ckpt, micro, 2), rel=1e-6)
    a, b = params(plain), params(ckpt)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    # generation runs the checkpointed blocks with a real KV cache
    assert ckpt.generate([1, 40, 41, 42], 6, []) == plain.generate([1, 40, 41, 42], 6, [])
    assert type(ckpt.model.layers[0]).__name__.startswith("Checkpointed")
    assert not type(plain.model.layers[0]).__name__.startswith("Checkpointed")  # other models untouched
    # --memory-mode checkpoint is the same switch (regression: only --grad-checkpoint reached MLX)
    assert type(mlx_backend(tiny_model_dir, memory_mode="checkpoint").model.layers[0]).__name__.startswith("Checkpointed")


def test_lora_init_scale_and_targets(tiny_model_dir):
    from mlx_ft.lora import DoRALinear, init_scale_bound

    a = mlx_backend(tiny_model_dir, lora_r=16, lora_alpha=8.0, use_rslora=True)
    layers = lora_layers(a.model)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.scale == pytest.approx(8.0 / 4.0)  # alpha / sqrt(r)
    bound = init_scale_bound(64)
    assert bound == pytest.approx(1 / 8) and float(mx.abs(q.lora_a).max()) <= bound
    assert float(mx.abs(q.lora_a).max()) > 0.9 * bound and float(mx.abs(q.lora_b).max()) == 0.0
    same = mlx_backend(tiny_model_dir, lora_r=16, lora_alpha=8.0, use_rslora=True)
    other = mlx_backend(tiny_model_dir, lora_r=16, seed=2)
    assert np.array_equal(np.array(lora_layers(same.model)["model.layers.0.self_attn.q_proj"].lora_a), np.array(q.lora_a))
    assert not np.array_equal(np.array(lora_layers(other.model)["model.layers.0.self_attn.q_proj"].lora_a),
                              np.array(q.lora_a))
    dora = mlx_backend(tiny_model_dir, use_dora=True, num_layers=1, targets=["q_proj", "mlp_proj"])
    d = lora_layers(dora.model)
    assert list(d) == ["model.layers.1.self_attn.q_proj"] and isinstance(d["model.layers.1.self_attn.q_proj"], DoRALinear)
    assert any("mlp_proj" in n for n in dora.info.notes)
    assert dora.info.target_modules == ["q_proj"] and dora.info.trainable_params == 4 * 64 * 2 + 64
    with pytest.raises(UserError, match="none of these modules"):
        mlx_backend(tiny_model_dir, targets=["fc1"])
    with pytest.raises(UserError, match="num-layers 3"):
        mlx_backend(tiny_model_dir, num_layers=3)
    assert len(lora_layers(mlx_backend(tiny_model_dir, targets=["all-linear"]).model)) == 14


def test_8bit_optimizer_is_adamw_with_a_note_and_memory_is_measured(tiny_model_dir):
    backend = mlx_backend(tiny_model_dir, optim="paged_adamw_8bit")
    assert any("using adamw on MLX" in n for n in backend.info.notes)  # the loop prints the notes
    run_steps(backend, batches(examples()), 1)
    assert backend.peak_memory() > 0
    assert backend.info.device == "cpu" and backend.info.dtype == "float32"


def test_bad_model_dir_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch"}')
    with pytest.raises(UserError, match="mlx-lm cannot load"):
        mlx_backend(tmp_path)


def test_device_flag(tiny_model_dir):
    if mx.is_available(mx.gpu):
        pytest.skip("this MLX has a GPU")
    with pytest.raises(UserError, match="has no GPU"):
        mlx_backend(tiny_model_dir, device="cuda")
    with pytest.raises(UserError, match="MLX knows cpu and gpu"):
        mlx_backend(tiny_model_dir, device="tpu")


def test_prequantized_mlx_checkpoint_trains(tiny_model_dir, tmp_path):
    """A 4-bit directory as mlx-community publishes them (written by mlx_lm.convert)."""
    import mlx.nn as nn
    from mlx_lm import convert

    q = tmp_path / "q4"
    convert(str(tiny_model_dir), mlx_path=str(q), quantize=True, q_bits=4, q_group_size=64)
    backend = mlx_backend(q, load_in_4bit=True)
    assert any("already quantised" in n for n in backend.info.notes)
    layers = lora_layers(backend.model)
    assert all(isinstance(m.linear, nn.QuantizedLinear) for m in layers.values())
    losses = run_steps(backend, batches(examples()), 3, lr=3e-2)
    assert losses[-1] < losses[0]
