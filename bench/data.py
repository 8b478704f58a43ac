"""Benchmark data: the shipped ``data/`` encoded exactly as ``llm-ft train`` encodes it, and a
synthetic Alpaca-like length mix (token ids only) for the GPU runs.

The synthetic mix: lengths drawn from a seeded lognormal with median ``median`` tokens
(sigma 0.75: p90 about 2.6x the median, p99 about 5.7x), clipped to ``[min_len, max_len]``;
the first 20-50% of each example is the prompt (loss mask 0), the rest the answer (1).
Throughput does not depend on the token values; they are drawn uniformly from the vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common.rows import Example


def alpaca_like(n: int, *, seed: int = 0, vocab: int = 128256, median: int = 200, sigma: float = 0.75,
                min_len: int = 16, max_len: int = 2048) -> list[Example]:
    """``n`` synthetic examples with an Alpaca-like length distribution (deterministic in ``seed``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), min_len, max_len).astype(int)
    out = []
    for n_tok in lengths.tolist():
        ids = rng.integers(0, vocab, n_tok).tolist()
        prompt = max(1, int(n_tok * rng.uniform(0.2, 0.5)))
        out.append(Example(input_ids=ids, loss_mask=[0] * prompt + [1] * (n_tok - prompt)))
    return out


def length_stats(examples: list[Example]) -> dict[str, Any]:
    lens = sorted(len(e.input_ids) for e in examples)
    if not lens:
        return {"n": 0}

    def q(p: float) -> int:
        return lens[min(len(lens) - 1, int(p * (len(lens) - 1)))]

    return {"n": len(lens), "min": lens[0], "median": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": lens[-1],
            "mean": round(sum(lens) / len(lens), 1), "tokens": sum(lens),
            "supervised": sum(sum(e.loss_mask[1:]) for e in examples)}


def shipped(model: str = "default", data: str = "data", max_seq_length: int = 1024):
    """``(model_dir, TrainData)`` for the shipped data, through ``llm-ft train``'s own preparation."""
    import tempfile

    from rich.console import Console

    from common.options import TrainConfig
    from common.train.cmd import prepare

    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        cfg = TrainConfig(model=model, data=[data], out=str(Path(tmp) / "run"), max_seq_length=max_seq_length,
                          sample_prompts=0)
        p = prepare(cfg, Console(stderr=True, quiet=True))
    return p.resolved.path, p.data


def save_examples(path: Path, examples: list[Example]) -> None:
    from common.io import write_json

    write_json(path, [[e.input_ids, e.loss_mask] for e in examples], indent=None)


def load_examples(path: Path) -> list[Example]:
    import json

    return [Example(input_ids=ids, loss_mask=mask) for ids, mask in json.loads(Path(path).read_text())]
