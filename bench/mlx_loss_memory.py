"""Peak memory of the MLX loss's forward and backward: the hand-written gradient of
``mlx_ft.loss.token_losses`` against autograd through ``logsumexp(logits.astype(float32))``.

``python -m bench.mlx_loss_memory [--targets 2048] [--vocab 128256] [--repeats 2]`` (any MLX device;
each side in a fresh process). A 2-layer Llama body (hidden 256) in bf16, frozen; the hidden states
of ``targets`` positions go through the tied output head (Llama-3's vocabulary by default) and
the loss; peak = ``mx.get_peak_memory()`` above what was allocated before ``value_and_grad``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, time
import mlx.core as mx
from mlx_lm.models import llama
from mlx_ft import loss as L
side, n, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = llama.ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab,
                       tie_word_embeddings=True, head_dim=64)
mx.random.seed(0)
model = llama.Model(args)
model.set_dtype(mx.bfloat16)
model.freeze()
mx.eval(model.parameters())
hidden = model.model(mx.random.randint(0, vocab, (1, n)).astype(mx.int32))[0]
targets = mx.random.randint(0, vocab, (n,)).astype(mx.int32)
head = model.model.embed_tokens.as_linear

def autograd(logits, t):
    picked = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return mx.logsumexp(logits.astype(mx.float32), axis=-1) - picked.astype(mx.float32)

fn = L.token_losses if side == "ours" else autograd
mx.eval(hidden, targets)
mx.reset_peak_memory()
before = mx.get_active_memory()
t0 = time.perf_counter()
value, grad = mx.value_and_grad(lambda h: fn(head(h), targets).sum())(hidden)
mx.eval(value, grad)
print(json.dumps({"side": side, "peak_gib": (mx.get_peak_memory() - before) / 2**30, "loss": value.item(),
                  "s": time.perf_counter() - t0}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    rows = []
    for _ in range(args.repeats):
        for side in ("autograd", "ours"):
            out = subprocess.run([sys.executable, "-c", CHILD, side, str(args.targets), str(args.vocab)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['side']:9s} peak {r['peak_gib']:.3f} GiB  loss {r['loss']:.4f}  {r['s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
