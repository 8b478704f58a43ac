"""The chunked loss's chunk size on the GPU: time and peak memory of one forward+backward.

``python3 -m bench.gpu_loss_chunk [--positions 2048] [--repeats 5]``

Llama-3.1-8B's head (hidden 4096, vocabulary 128,256, bf16): the loss of ``--positions``
supervised positions through torch_ft.loss's chunks (each chunk's logits recomputed in
backward), for several fp32-logit budgets per chunk. Peak = CUDA max_memory_allocated above
the hidden states and the head, i.e. what the loss adds to a training step's peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    import torch

    from torch_ft import loss as losses

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budgets", default="26,25,24,23", help="log2 of the fp32 logits per chunk")
    args = ap.parse_args()
    hidden, vocab = 4096, 128256
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)

    class LM(torch.nn.Module):  # what supervised_loss asks of a causal LM, around fixed hidden states
        def __init__(self, h):
            super().__init__()
            self.h, self.config = h, type("C", (), {})()

        def get_decoder(self):
            return lambda **_: type("O", (), {"last_hidden_state": self.h})()

        def get_output_embeddings(self):
            return head

    ids = torch.randint(0, vocab, (1, args.positions + 1), device="cuda")
    mask = torch.ones_like(ids)
    rows = []
    for bits in [int(b) for b in args.budgets.split(",")]:
        losses.LOGITS_BUDGET = 2 ** bits
        times, peaks, value = [], [], None
        for _ in range(args.repeats + 1):
            h = torch.randn(1, args.positions + 1, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            total, n = losses.supervised_loss(LM(h), {"input_ids": ids}, mask)
            total.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated() - base)
            value = float(total) / n
            del h, total
        times, peaks = times[1:], peaks[1:]  # the first pass warms cuBLAS up
        row = {"budget": f"2**{bits}", "chunk_positions": max(128, 2 ** bits // vocab),
               "ms_median": round(1000 * statistics.median(times), 2),
               "ms_range": [round(1000 * min(times), 2), round(1000 * max(times), 2)],
               "peak_mib": round(max(peaks) / 2**20, 1), "loss": round(value, 5)}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
