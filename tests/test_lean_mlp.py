"""Values recomputed in backward instead of stored: the gated MLP's activation product
(torch_ft.lean_mlp) and the normalised layer inputs (torch_ft.norm_recompute); and sibling LoRA
projections that read one input trained as one node (torch_ft.lora_forward.SharedInput).

A tiny real llama (fp32, CPU) with LoRA on every projection: the patched model must give the
unpatched model's loss and LoRA gradients, keep fewer values for backward (not the
tokens x intermediate product, not the two tokens x hidden norm outputs per layer), and leave
the cases it does not cover on peft's own forward.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from torch_ft import lean_mlp, lora_forward, norm_recompute  # noqa: E402

TOKENS = 24
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(act: str = "silu", dropout: float = 0.0, dora: bool = False, patch: bool = True, norms: bool = False,
           group: bool | None = None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=88, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=64, hidden_act=act, attn_implementation="sdpa")
    base = transformers.LlamaForCausalLM(cfg)
    for p in base.parameters():
        p.requires_grad_(False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout, use_dora=dora)
    model = peft.get_peft_model(base, lora)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give it values so every adapter gradient is non-trivial
            p.data.normal_(0, 0.2)
    lora_forward.install(model, group=patch if group is None else group)
    changed = lean_mlp.install(model) if patch else 0
    if norms:
        model.norm_hooks = norm_recompute.install(model.get_base_model())
    return model, changed


def _loss_and_grads(model):
    ids = torch.arange(TOKENS).remainder(64)[None] * 7 % 64
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("act,norms", [("silu", False), ("gelu_pytorch_tanh", False), ("silu", True)])
def test_patched_model_gives_the_same_loss_and_gradients(act, norms):
    plain, _ = _model(act, patch=False)
    lean, changed = _model(act, norms=norms)
    assert changed == 2  # one MLP per layer
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(lean)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("down_proj.lora_A" in n for n in grads_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-6, msg=name)
        assert float(g.abs().sum()) > 0, name
    if norms:  # 2 norms x 2 layers, each saved (at least once) by the LoRA projections it feeds
        assert lean.norm_hooks.recipes >= 2 * 2


def test_grouped_projections_give_peft_losses_and_gradients(monkeypatch):
    """q/k/v and gate/up as one SharedInput node each: the same loss, LoRA gradients and input gradients."""
    calls = []
    real = lora_forward.SharedInput.apply
    monkeypatch.setattr(lora_forward.SharedInput, "apply", lambda *a: calls.append(len(a[1])) or real(*a))
    for patch in (False, True):  # alone, and under lean_mlp's forward
        plain, _ = _model(patch=False)
        grouped, _ = _model(patch=patch, group=True)
        calls.clear()
        loss_a, grads_a = _loss_and_grads(plain)
        loss_b, grads_b = _loss_and_grads(grouped)
        assert sorted(calls) == [2, 2, 3, 3]  # per layer: gate+up, q+k+v
        assert loss_b == pytest.approx(loss_a, rel=1e-6) and grads_a.keys() == grads_b.keys()
        for name, g in grads_a.items():
            torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-6, msg=name)
        embeds = plain.get_input_embeddings()(torch.arange(TOKENS)[None]).detach()
        dx = []
        for m in (plain, grouped):  # the gradient that reaches the first layer's input (its sums run in another order)
            x = embeds.clone().requires_grad_()
            dx.append(torch.autograd.grad(m(inputs_embeds=x).logits.square().sum(), x)[0])
        torch.testing.assert_close(dx[1], dx[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # inference takes each layer's own forward
        calls.clear()
        grouped(input_ids=torch.arange(TOKENS)[None])
        assert calls == []


def test_grouping_steps_aside_for_a_disabled_or_uncovered_adapter():
    grouped, _ = _model(group=True, patch=False)
    ids = torch.arange(TOKENS)[None]
    with grouped.disable_adapter():
        off = grouped(input_ids=ids).logits
    plain, _ = _model(patch=False)
    with plain.disable_adapter():
        torch.testing.assert_close(off, plain(input_ids=ids).logits)
    dropout, _ = _model(dropout=0.1, group=True)  # dropout: peft's forward, layer by layer
    dropout.eval()
    assert torch.isfinite(dropout(input_ids=ids, labels=ids).loss)


def _saved_values(model) -> int:
    """Values autograd keeps for backward over one forward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes() // t.element_size())
        return t

    ids = torch.arange(TOKENS)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(seen.values())


def test_patched_model_keeps_neither_product_nor_norm_outputs():
    plain, _ = _model(patch=False)
    saved_plain = _saved_values(plain)
    saved_mlp = _saved_values(_model()[0])
    saved_both = _saved_values(_model(norms=True)[0])
    inter, hidden, layers = (plain.config.intermediate_size, plain.config.hidden_size,
                             plain.config.num_hidden_layers)
    # the product h (tokens x intermediate) per layer is gone; its rank-r projection stays
    assert saved_plain - saved_mlp >= layers * TOKENS * (inter - 4)
    # and the two norm outputs (tokens x hidden each) per layer
    assert saved_mlp - saved_both >= layers * TOKENS * 2 * hidden


def test_norm_hooks_stay_out_of_inference():
    lean, _ = _model(norms=True)
    ids = torch.arange(TOKENS)[None]
    with torch.no_grad():
        lean(input_ids=ids)
    assert lean.norm_hooks.recipes == 0 and lean.norm_hooks._context is None
    with pytest.raises(IndexError):  # a failing forward leaves no saved-tensor hooks behind
        lean(input_ids=torch.tensor([[10_000]]))
    assert lean.norm_hooks._context is None
    x = torch.ones(2, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ("outer", t), lambda p: p[1]):
        (x * x).sum().backward()  # the global hook stack is balanced: a new pair pushes and pops cleanly
    assert x.grad.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("kwargs", [{"dropout": 0.1}, {"dora": True}])
def test_uncovered_adapters_keep_peft_forward(kwargs):
    _, changed = _model(**kwargs)
    assert changed == 0


def test_disabled_adapter_falls_back_to_the_module_forward():
    lean, changed = _model()
    assert changed == 2
    ids = torch.arange(TOKENS)[None]
    with lean.disable_adapter(), torch.no_grad():
        off = lean(input_ids=ids).logits
        base = lean.get_base_model()
        # the same model without adapters: the base alone
        for layer in base.model.layers:
            assert layer.mlp.down_proj.disable_adapters
    plain, _ = _model(patch=False)
    with plain.disable_adapter(), torch.no_grad():
        ref = plain(input_ids=ids).logits
    torch.testing.assert_close(off, ref)


def test_shared_input_with_its_own_scaling_and_rank_per_layer():
    """SharedInput against the formula, in float64: layers of different ranks and scalings, every gradient."""
    torch.manual_seed(0)
    bases = [torch.nn.Linear(6, out, bias=bias).double().requires_grad_(False)
             for out, bias in ((5, False), (3, True), (4, False))]
    ranks, scalings = (2, 3, 1), [0.5, 2.0, 1.25]
    ab = [t.requires_grad_() for r, base in zip(ranks, bases, strict=True)
          for t in (torch.randn(r, 6, dtype=torch.float64), torch.randn(base.out_features, r, dtype=torch.float64))]
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)

    def formula(x, *ab):
        return tuple(base(x) + s * (x @ ab[2 * i].t()) @ ab[2 * i + 1].t()
                     for i, (base, s) in enumerate(zip(bases, scalings, strict=True)))

    got = lora_forward.SharedInput.apply(x, bases, scalings, *ab)
    want = formula(x, *ab)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    weights = [torch.randn_like(w) for w in want]  # a loss that weighs every output differently
    grads_got = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, weights, strict=True)), [x, *ab])
    grads_want = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, weights, strict=True)), [x, *ab])
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w)
