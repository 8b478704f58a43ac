"""Shared helpers of the MLX backend tests (no tests here): configs, batches, adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.options import TrainConfig
from common.rows import Example
from common.train.batching import make_batch


def train_config(**kw) -> TrainConfig:
    """A TrainConfig for the tiny model: small rank, fp32 on the CPU."""
    cfg = TrainConfig()
    cfg.lora_r, cfg.lora_alpha, cfg.seed, cfg.device, cfg.dtype = 4, 8.0, 1, "cpu", "float32"
    for k, v in kw.items():
        assert hasattr(cfg, k), k
        setattr(cfg, k, v)
    return cfg


def examples(seed: int = 0, lengths=(9, 7, 12, 5), prompt: int = 3) -> list[Example]:
    """Random token rows (ids 3..399 of the tiny vocabulary), the first ``prompt`` tokens unsupervised."""
    rng = np.random.default_rng(seed)
    return [Example([int(x) for x in rng.integers(3, 399, n)], [0] * prompt + [1] * (n - prompt)) for n in lengths]


def batches(exs: list[Example]) -> list:
    """Two micro-batches: two padded rows, then one packed row of two examples."""
    return [make_batch([[exs[0]], [exs[1]]], 0), make_batch([[exs[2], exs[3]]], 0)]


def mlx_backend(model_dir: Path, compile: bool = True, **kw):
    from mlx_ft.backend import MLXBackend

    b = MLXBackend(compile=compile)
    b.info = b.setup(Path(model_dir), train_config(**kw), 0)
    return b


def randomize_b(backend, seed: int = 0, std: float = 0.05) -> None:
    """Move every lora_b off zero (as training would), so the adapter changes the logits."""
    import mlx.core as mx

    from mlx_ft.lora import lora_layers

    rng = np.random.default_rng(seed)
    for layer in lora_layers(backend.model).values():
        layer.lora_b = mx.array(rng.normal(0, std, layer.lora_b.shape).astype(np.float32))


def adapter_arrays(adapter_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def torch_peft_logits(model_dir: Path, adapter_dir: Path, ids: list[list[int]]) -> np.ndarray:
    """Logits of transformers + peft with the adapter (fp32, eval mode)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()
