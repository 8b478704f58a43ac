"""The MLX loss at supervised positions only (mlx_ft.loss) and the step's in-graph finite guard."""

from __future__ import annotations

import numpy as np
import pytest
from test_mlx_support import examples, mlx_backend, randomize_b

from common.train.batching import make_batch

pytestmark = [pytest.mark.mlx, pytest.mark.torch]
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("torch")

from mlx.utils import tree_flatten  # noqa: E402

from mlx_ft import loss as mlxloss  # noqa: E402
from mlx_ft.model import is_packed  # noqa: E402


def full_logits_loss(backend, ex) -> float:
    """The reference: fp64 cross-entropy from the full logits of one example, summed at its targets."""
    logits = np.array(backend.logits([ex.input_ids])[0], dtype=np.float64)
    top = logits.max(axis=-1)
    lse = np.log(np.exp(logits - top[:, None]).sum(axis=-1)) + top
    return sum(lse[t - 1] - logits[t - 1, ex.input_ids[t]] for t in range(1, len(ex)) if ex.loss_mask[t])


@pytest.mark.parametrize("arch,tie,head", [("llama", True, "as_linear"), ("llama", False, "lm_head"),
                                           ("gemma2", True, None)])
def test_loss_at_targets_equals_the_full_logits_loss(arch, tie, head, tiny_tokenizer_dir, tmp_path):
    from tiny import make_model

    d = make_model(tmp_path / arch, arch, tokenizer_dir=tiny_tokenizer_dir, tie=tie)
    backend = mlx_backend(d)
    randomize_b(backend)
    # gemma2 soft-caps its logits after the head: the probe must refuse the split there
    got = backend.head if backend.head is None else getattr(backend.head, "__name__", "lm_head")
    assert got == head
    exs = examples(lengths=(11, 6, 8, 9))
    for batch in (make_batch([[e] for e in exs], 0), make_batch([exs[:2], exs[2:]], 0)):
        expected = sum(full_logits_loss(backend, e) for e in exs)
        # rounding shapes up (as on a GPU) adds padding columns and filler targets only
        for multiple, bits in ((1, None), (32, None), (1, 2)):
            backend.shape_multiple = backend.packed_width = multiple
            backend.target_bits = bits
            v = mlxloss.views(batch, 0, packed=is_packed(batch), width_multiple=multiple, target_multiple=multiple,
                              target_bits=bits)
            assert v.inputs.shape[1] % multiple == 0 and v.picks.shape[0] % multiple == 0
            assert v.picks.shape[0] == mlxloss.bucket(batch.n_supervised, multiple, bits)
            assert v.count == batch.n_supervised
            s, n = backend.eval_loss(batch)
            assert n == batch.n_supervised and s == pytest.approx(expected, rel=1e-5)
            assert backend.forward_backward(batch, 1.0) == pytest.approx(expected, rel=1e-5)  # the compiled step
            backend.optimizer_step(0.0, 0.0, skip=True)


def test_nonfinite_gradient_of_a_finite_loss_is_skipped_in_the_graph(tiny_model_dir):
    # Guards the where() in the compiled update: a NaN gradient must not reach the adapter or Adam's state.
    backend = mlx_backend(tiny_model_dir)
    batch = make_batch([[e] for e in examples()], 0)
    backend.forward_backward(batch, 1.0 / batch.n_supervised)
    assert backend.optimizer_step(1e-2, 1.0).finite
    before = {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())}
    state = {k: np.array(v) for k, v in tree_flatten(backend.optimizer.state)}
    loss = backend.forward_backward(batch, float("inf"))  # the loss is finite, its scaled gradient is not
    assert np.isfinite(loss)
    stats = backend.optimizer_step(1e-2, 1.0)
    assert (stats.finite, stats.skipped) == (False, True)
    after = {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(np.array_equal(state[k], np.array(v)) for k, v in tree_flatten(backend.optimizer.state))
    assert int(backend.optimizer.state["step"]) == 1


def test_rounded_shapes_train_like_exact_ones(tiny_model_dir):
    # The GPU's rounding (padding columns, filler targets, packed rows at full length) must not change a step.
    micro = [make_batch([[e] for e in examples()[:2]], 0), make_batch([examples()[2:]], 0)]
    exact, rounded = mlx_backend(tiny_model_dir), mlx_backend(tiny_model_dir)
    rounded.shape_multiple, rounded.packed_width, rounded.target_bits = 32, 64, 2
    for _ in range(2):
        for b in (exact, rounded):
            total = sum(m.n_supervised for m in micro)
            b.losses = [b.forward_backward(m, 1.0 / total) for m in micro]
            b.stats = b.optimizer_step(1e-2, 1.0)
        assert rounded.losses == pytest.approx(exact.losses, rel=1e-6)
        assert rounded.stats.grad_norm == pytest.approx(exact.stats.grad_norm, rel=1e-5)
    a, b = (dict(tree_flatten(x.model.trainable_parameters())) for x in (exact, rounded))
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=1e-6, err_msg=k)


def test_target_buckets_bound_the_filler_and_the_number_of_shapes():
    # Guards MLX-CUDA's trace count: with counts rounded to 32 only, nearly every length-grouped batch had a
    # new number of targets, so a new mx.compile trace (round 4 of bench/RESULTS.md).
    sizes = [mlxloss.bucket(n, 32, 4) for n in range(1, 9000)]
    for n, size in enumerate(sizes, start=1):
        assert size >= n and size % 32 == 0, n
        assert size - n < max(32, n / 8), n  # at most 12.5% filler rows at the head
    assert len(set(sizes[2048:4096])) == 8  # counts 2049..4096 share 8 shapes (64 with multiples of 32 only)
    assert len({mlxloss.bucket(n, 32) for n in range(2049, 4097)}) == 64
    assert mlxloss.bucket(2660, 32, 4) == 2816
    assert [mlxloss.bucket(n) for n in (1, 37, 2660)] == [1, 37, 2660]  # the CPU's exact counts


def _autograd_token_losses(logits, targets):
    """What token_losses computed before its hand-written gradient: autograd through fp32 logsumexp."""
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return mx.logsumexp(logits.astype(mx.float32), axis=-1) - picked.astype(mx.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hand_written_gradient_matches_autograd(dtype):
    dt = getattr(mx, dtype)
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (48, 777)).astype(np.float32)
    targets = rng.integers(0, 777, 48).astype(np.int32)
    logits[0] = 0.0  # a confident row: 1 - p_t = 776 e^-14 ~ 6e-4, below bf16's resolution just under 1 (2^-9)
    logits[0, targets[0]] = 14.0
    logits, targets = mx.array(logits).astype(dt), mx.array(targets)
    weights = mx.array(rng.uniform(0, 2, 48).astype(np.float32))

    def loss(fn):
        return lambda x: (fn(x, targets) * weights).sum()

    want_v, want_g = mx.value_and_grad(loss(_autograd_token_losses))(logits)
    for fn in (loss(mlxloss.token_losses), mx.compile(loss(mlxloss.token_losses))):
        got_v, got_g = mx.value_and_grad(fn)(logits)
        assert got_g.dtype == dt and got_v.item() == pytest.approx(want_v.item(), rel=1e-6)
        got, want = np.array(got_g.astype(mx.float32)), np.array(want_g.astype(mx.float32))
        ulp = 2.0 ** -8 if dtype == "bfloat16" else 1e-6  # bf16: one more rounding than autograd's path
        np.testing.assert_allclose(got, want, rtol=ulp, atol=ulp * float(np.abs(want).max()))
        assert got[0, int(targets[0].item())] < 0  # the confident row's target still pulls up (not rounded to 0)
