"""Correctness of the GPU-only kernels paths on the device (no GPU in CI): run before trusting speed.

``python3 -m bench.gpu_checks``

A small random Llama (GQA, 4 layers) in bf16 on CUDA, LoRA on every linear layer. The same
packed batches (several examples per row, plus padding) go through our torch backend with
SDPA and a dense block-diagonal mask and peft's own LoRA forward and MLP (the reference, no
Liger), and with our lean LoRA forward (torch_ft.lora_forward) and MLP (torch_ft.lean_mlp, which
for QLoRA dequantises the 4-bit down_proj in backward) plus varlen attention, and
with varlen attention + Liger kernels: per-step losses over 4 optimizer steps and the first
step's LoRA gradients must agree within bf16 noise. Also checks that a packed row gives each
example the same loss it gets alone in a row (no attention across examples). Exit 1 on a miss.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

LOSS_RTOL = 2e-2
GRAD_COS = 0.99


def _model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


def _batches():
    import numpy as np

    from common.rows import Example
    from common.train.batching import make_batch

    rng = np.random.default_rng(0)

    def ex(n):
        ids = rng.integers(3, 1024, size=n).tolist()
        cut = n // 3
        return Example(ids, [0] * cut + [1] * (n - cut))

    rows = [[[ex(120), ex(333), ex(57)], [ex(400)]], [[ex(900), ex(31), ex(64)]], [[ex(210)], [ex(77)], [ex(500)]],
            [[ex(1000), ex(600)]]]
    return [make_batch(r, pad_id=0) for r in rows]


def _run(model_dir: Path, batches, peft_forward: bool = False, **over):
    import torch

    from bench.ours import train_config
    from torch_ft.backend import TorchBackend

    cfg = train_config(model=str(model_dir), backend="torch", device="cuda", dtype="bfloat16",
                       targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                       lora_r=16, lora_alpha=32.0, packing=True, max_seq_length=4096, batch_size=1, seed=1)
    cfg = replace(cfg, **over)
    be = TorchBackend()
    info = be.setup(model_dir, cfg, pad_id=0)
    if peft_forward:  # the reference: peft's own LoRA forward and MLP, not torch_ft.lora_forward's or lean_mlp's
        from torch_ft.lean_mlp import GATED_MLPS

        for m in be.model.modules():
            if "forward" in vars(m) and (hasattr(m, "lora_A") or type(m).__name__ in GATED_MLPS):
                del m.forward
    losses, grads = [], None
    for i, b in enumerate(batches):
        losses.append(be.forward_backward(b, 1.0 / b.n_supervised))
        if i == 0:
            grads = torch.cat([p.grad.detach().float().flatten() for p in be.params if p.grad is not None])
        be.optimizer_step(1e-3, 1.0)
    notes = info.notes
    del be
    torch.cuda.empty_cache()
    return losses, grads, notes


def _probe_gqa() -> str:
    """Does this torch's varlen_attn take fewer KV heads than query heads as they are?"""
    import torch

    from torch_ft.attention import _varlen

    impl = _varlen()
    if impl is None:
        return "no varlen_attn"
    fn, causal, _, _ = impl
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(300, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    ref = fn(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), cu, cu, 200, 200, **causal)
    try:
        out = fn(q, k, v, cu, cu, 200, 200, **causal)
    except Exception as exc:  # noqa: BLE001 - reporting what this torch does
        return f"no ({type(exc).__name__}: {str(exc)[:120]})"
    return f"yes, max diff {float((out - ref).abs().max()):.1e}"


def main() -> int:
    import torch

    from bench.ours import train_config
    from common.rows import Example
    from common.train.batching import make_batch
    from torch_ft import attention
    from torch_ft.backend import TorchBackend

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    ok = True
    report: dict = {"torch": torch.__version__, "gqa_native": _probe_gqa()}
    print(f"torch {torch.__version__}; varlen_attn with fewer KV heads than query heads, no repeat: "
          f"{report['gqa_native']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model(Path(tmp) / "m")
        batches = _batches()
        ref, ref_g, ref_notes = _run(model_dir, batches, peft_forward=True, attention="sdpa", kernels="off")
        report["reference"] = {"losses": ref, "notes": ref_notes}
        ref_q, ref_qg, _ = _run(model_dir, batches, peft_forward=True, attention="sdpa", kernels="off",
                                load_in_4bit=True)
        report["reference_qlora"] = {"losses": ref_q}
        for name, over in (("varlen", {"attention": "varlen", "kernels": "off"}),
                           ("varlen+liger", {"attention": "varlen", "kernels": "liger"}),
                           ("varlen+native", {"attention": "varlen", "kernels": "native"}),
                           ("qlora varlen", {"attention": "varlen", "kernels": "off", "load_in_4bit": True})):
            before = dict(attention.calls)
            losses, g, notes = _run(model_dir, batches, **over)
            used = {k: attention.calls[k] - before[k] for k in before}
            if "qlora" in name:
                ref, ref_g = ref_q, ref_qg
            ok &= used["sdpa"] == 0 and used["varlen"] > 0
            print(f"{name}: attention calls {used}", flush=True)
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref, strict=True))
            cos = float(torch.nn.functional.cosine_similarity(g, ref_g, dim=0))
            good = rel <= LOSS_RTOL and cos >= GRAD_COS
            ok &= good
            report[name] = {"losses": losses, "max_rel_loss_diff": rel, "grad_cosine": cos, "notes": notes, "ok": good}
            print(f"{name}: losses {[round(x, 5) for x in losses]} vs sdpa {[round(x, 5) for x in ref]}: "
                  f"max rel {rel:.2e}, first-step LoRA grad cosine {cos:.5f} -> {'ok' if good else 'MISS'}", flush=True)
        # isolation: a packed row's per-example losses equal each example alone (varlen path)
        first = batches[0]
        cfg = train_config(model=str(model_dir), backend="torch", device="cuda", dtype="bfloat16", packing=True,
                           max_seq_length=4096, batch_size=1, seed=1, attention="varlen", kernels="off")
        be = TorchBackend()
        be.setup(model_dir, cfg, pad_id=0)
        row = []
        seg = first.segment_ids[0]
        for s in sorted(set(seg) - {0}):
            idx = [t for t, v in enumerate(seg) if v == s]
            row.append(Example([first.input_ids[0][t] for t in idx], [first.loss_mask[0][t] for t in idx]))
        packed_sum, n_packed = be.eval_loss(make_batch([row], pad_id=0))
        alone = [be.eval_loss(make_batch([[e]], pad_id=0)) for e in row]
        alone_sum = sum(x for x, _ in alone)
        rel = abs(packed_sum - alone_sum) / abs(alone_sum)
        good = rel <= 5e-3 and n_packed == sum(n for _, n in alone)
        ok &= good
        report["isolation"] = {"packed": packed_sum, "alone": alone_sum, "rel": rel, "ok": good}
        print(f"isolation: packed row loss sum {packed_sum:.4f} vs each example alone {alone_sum:.4f} "
              f"(rel {rel:.1e}) -> {'ok' if good else 'MISS'}", flush=True)
    print(json.dumps(report, default=str)[:4000])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
