"""DPO, IPO and ORPO on the MLX backend against the formulas computed independently in the test,
and the per-step DPO losses of MLX and torch from the same start on the same data."""

from __future__ import annotations

import types

import numpy as np
import pytest
from preference_support import CASES, pairs, reference
from test_mlx_support import mlx_backend, randomize_b

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402

from common.train.methods import PreferenceSpec, make_pair_batch  # noqa: E402
from mlx_ft.lora import lora_layers  # noqa: E402

OPS = types.SimpleNamespace(logsigmoid=nn.log_sigmoid, log1p=mx.log1p, exp=mx.exp)


def side_logps(model, ex):
    """An answer's log-prob sum from the full logits of that sequence alone."""
    logits = model(mx.array([ex.input_ids], dtype=mx.int32))[0].astype(mx.float32)
    logp = logits[:-1] - mx.logsumexp(logits[:-1], axis=-1, keepdims=True)
    token = mx.take_along_axis(logp, mx.array(ex.input_ids[1:])[:, None], axis=-1)[:, 0]
    mask = mx.array(ex.loss_mask[1:], dtype=mx.float32)
    return (token * mask).sum(), mask.sum()


def reference_logps(model, ex):
    """The base model's: every LoRA scale at 0 for the pass (a plain LoRA then adds nothing)."""
    layers = lora_layers(model).values()
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        return mx.stop_gradient(side_logps(model, ex)[0])
    finally:
        for m, s in zip(layers, scales, strict=True):
            m.scale = s


def expected(b, ps, method, dpo_loss):
    model = b.model
    refs = [(reference_logps(model, p.chosen), reference_logps(model, p.rejected)) for p in ps]

    def loss_fn(model):
        losses, chosen, rejected = [], [], []
        for p, (rc, rr) in zip(ps, refs, strict=True):
            (pc, nc), (pr, nr) = side_logps(model, p.chosen), side_logps(model, p.rejected)
            loss, c, r = reference(method, pc, pr, nc, nr, rc, rr, OPS, beta=0.1, dpo_loss=dpo_loss or "sigmoid",
                                   lam=0.1)
            losses.append(loss)
            chosen.append(c)
            rejected.append(r)
        return mx.stack(losses).mean(), mx.stack(chosen), mx.stack(rejected)

    (loss, c, r), grads = nn.value_and_grad(model, loss_fn)(model)
    return float(loss), np.array(c), np.array(r), dict(tree_flatten(grads))


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("method,dpo_loss", CASES, ids=["dpo", "ipo", "orpo"])
def test_loss_rewards_and_gradients_equal_the_formulas(tiny_model_dir, method, dpo_loss, packed):
    b = mlx_backend(tiny_model_dir)
    randomize_b(b)
    ps = pairs()
    spec = PreferenceSpec(method, beta=0.1, dpo_loss=dpo_loss or "sigmoid", orpo_lambda=0.1)
    loss, sums = b.preference_forward_backward(make_pair_batch(ps, 0, packed), 1.0 / len(ps), spec)
    got = dict(tree_flatten(b._grads))
    b._grads = None
    want_loss, want_c, want_r, want = expected(b, ps, method, dpo_loss)
    assert loss / len(ps) == pytest.approx(want_loss, rel=1e-5)
    assert sums["rewards/chosen"] == pytest.approx(want_c.sum(), rel=1e-5, abs=1e-6)
    assert sums["rewards/rejected"] == pytest.approx(want_r.sum(), rel=1e-5, abs=1e-6)
    assert sums["rewards/accuracies"] == float((want_c > want_r).sum())
    assert sorted(got) == sorted(want) and got
    for name, g in got.items():
        g, w = np.array(g), np.array(want[name])
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w) + 1e-9, name


def test_reference_swaps_layers_back_and_adds_no_model(tiny_model_dir):
    b = mlx_backend(tiny_model_dir)
    randomize_b(b)
    before = {k: np.array(v) for k, v in tree_flatten(b.model.parameters())}
    n_modules = len(b.model.named_modules())
    ps = pairs(n=2)
    batch = make_pair_batch(ps, 0)
    base = b.sequence_logps(batch, adapter=False)
    policy = b.sequence_logps(batch, adapter=True)
    want = [float(reference_logps(b.model, ex)) for p in ps for ex in (p.chosen, p.rejected)]
    assert [s for s, _ in base] == pytest.approx(want, rel=1e-5)
    assert [s for s, _ in policy] != pytest.approx(want, rel=1e-3)
    after = {k: np.array(v) for k, v in tree_flatten(b.model.parameters())}
    assert sorted(after) == sorted(before) and len(b.model.named_modules()) == n_modules
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.torch
def test_mlx_and_torch_dpo_losses_agree_step_by_step(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    from test_mlx_parity import torch_backend

    mlx = mlx_backend(tiny_model_dir)
    randomize_b(mlx)
    (tmp_path / "init").mkdir()
    mlx.save_adapter(tmp_path / "init", "tiny")
    mlx.load_adapter(tmp_path / "init")
    pt = torch_backend(tiny_model_dir)
    pt.load_adapter(tmp_path / "init")
    micro = [make_pair_batch(pairs(seed=1, n=2), 0), make_pair_batch(pairs(seed=2, n=2), 0, packed=True)]
    spec = PreferenceSpec("dpo")
    for step in range(6):
        losses = []
        for backend in (mlx, pt):
            losses.append(sum(backend.preference_forward_backward(m, 0.25, spec)[0] for m in micro))
            backend.optimizer_step(1e-2, 1.0)
        assert losses[0] == pytest.approx(losses[1], abs=1e-4), f"step {step}: mlx {losses[0]} torch {losses[1]}"
