"""DPO, IPO and ORPO on the torch backend against the formulas computed independently in the test."""

from __future__ import annotations

import types

import numpy as np
import pytest
from preference_support import CASES, pairs, reference
from test_mlx_support import train_config

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from common.train.methods import PreferenceSpec, make_pair_batch  # noqa: E402

OPS = types.SimpleNamespace(logsigmoid=torch.nn.functional.logsigmoid, log1p=torch.log1p, exp=torch.exp)


def torch_backend(model_dir, seed: int = 0):
    from torch_ft.backend import TorchBackend

    torch.set_num_threads(1)
    b = TorchBackend()
    b.setup(model_dir, train_config(), 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B != 0: the policy differs from the reference
        for name, p in b.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return b


def side_logps(model, ex):
    """An answer's log-prob sum from the full logits of that sequence alone, in float64."""
    ids = torch.tensor([ex.input_ids])
    logits = model(input_ids=ids).logits[0].double()
    token = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(ex.loss_mask[1:], dtype=torch.float64)
    return (token * mask).sum(), mask.sum()


def expected(b, ps, method, dpo_loss):
    """(mean loss, chosen rewards, rejected rewards, gradients by name) of the formulas, by autograd."""
    model = b.model
    losses, rc_all, rr_all = [], [], []
    for p in ps:
        (pc, nc), (pr, nr) = side_logps(model, p.chosen), side_logps(model, p.rejected)
        rc = rr = None
        if method == "dpo":
            with torch.no_grad(), model.disable_adapter():
                rc, rr = side_logps(model, p.chosen)[0], side_logps(model, p.rejected)[0]
        loss, c, r = reference(method, pc, pr, nc, nr, rc, rr, OPS, beta=0.1, dpo_loss=dpo_loss or "sigmoid", lam=0.1)
        losses.append(loss)
        rc_all.append(float(c.detach()))
        rr_all.append(float(r.detach()))
    mean = torch.stack(losses).mean()
    mean.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(mean.detach()), np.array(rc_all), np.array(rr_all), grads


@pytest.mark.parametrize("per_pass", [None, 1], ids=["whole", "row-by-row"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("method,dpo_loss", CASES, ids=["dpo", "ipo", "orpo"])
def test_loss_rewards_and_gradients_equal_the_formulas(tiny_model_dir, method, dpo_loss, packed, per_pass,
                                                       monkeypatch):
    if per_pass is not None:  # the CPU's row groups smaller than a pair: the two-stage gradient
        from torch_ft import preference

        monkeypatch.setattr(preference, "rows_per_pass", lambda rows, width, kind: per_pass)
    b = torch_backend(tiny_model_dir)
    ps = pairs()
    spec = PreferenceSpec(method, beta=0.1, dpo_loss=dpo_loss or "sigmoid", orpo_lambda=0.1)
    loss, sums = b.preference_forward_backward(make_pair_batch(ps, 0, packed), 1.0 / len(ps), spec)
    got = {n: p.grad.clone() for n, p in b.model.named_parameters() if p.requires_grad}
    b.optimizer.zero_grad(set_to_none=True)
    want_loss, want_c, want_r, want_grads = expected(b, ps, method, dpo_loss)
    assert loss / len(ps) == pytest.approx(want_loss, rel=1e-5)
    assert sums["rewards/chosen"] == pytest.approx(want_c.sum(), rel=1e-5, abs=1e-7)
    assert sums["rewards/rejected"] == pytest.approx(want_r.sum(), rel=1e-5, abs=1e-7)
    assert sums["rewards/accuracies"] == float((want_c > want_r).sum())
    assert sorted(got) == sorted(want_grads) and got
    for name, g in got.items():
        w = want_grads[name].float()
        assert torch.linalg.norm(g - w) <= 1e-5 * torch.linalg.norm(w) + 1e-9, name


def test_reference_is_the_base_without_a_second_model(tiny_model_dir):
    b = torch_backend(tiny_model_dir)
    n_params = sum(p.numel() for p in b.model.parameters())
    n_modules = sum(1 for _ in b.model.modules())
    ps = pairs(n=2)
    batch = make_pair_batch(ps, 0)
    base = b.sequence_logps(batch, adapter=False)
    policy = b.sequence_logps(batch, adapter=True)
    b.preference_forward_backward(batch, 0.5, PreferenceSpec("dpo"))
    # the reference pass added no parameters and no modules: it is the same model with the adapter off
    assert sum(p.numel() for p in b.model.parameters()) == n_params
    assert sum(1 for _ in b.model.modules()) == n_modules
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        want = [float(side_logps(plain, ex)[0]) for p in ps for ex in (p.chosen, p.rejected)]
    assert [s for s, _ in base] == pytest.approx(want, rel=1e-5)
    assert [s for s, _ in policy] != pytest.approx(want, rel=1e-3)  # the adapter is on otherwise
    assert [n for _, n in base] == [sum(ex.loss_mask[1:]) for p in ps for ex in (p.chosen, p.rejected)]
