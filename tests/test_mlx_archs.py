"""Each tiny architecture on MLX: logits equal transformers', and a packed batch (several
rows of several examples) gives the same loss as one example per row."""

from __future__ import annotations

import numpy as np
import pytest
from test_mlx_support import examples, mlx_backend

from common.archs import ARCHS
from common.train.batching import make_batch

pytestmark = [pytest.mark.mlx, pytest.mark.torch]
pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

IDS = [[5, 17, 42, 99, 3, 250, 7, 61, 12, 300]]
# gemma3: mlx-lm indexes layer (sliding_window_pattern - 1) = 5, so it needs 6 layers
LAYERS = {"gemma3": 6}


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - {"llama"}))  # llama: the MLX backend tests' own model
def test_architecture(arch, tiny_tokenizer_dir, tmp_path):
    from tiny import make_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    d = make_model(tmp_path / arch, arch, tokenizer_dir=tiny_tokenizer_dir, layers=LAYERS.get(arch, 2))
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(IDS)).logits.numpy()
    backend = mlx_backend(d)
    np.testing.assert_allclose(np.array(backend.logits(IDS)), theirs, atol=5e-5, rtol=1e-4)
    exs = examples(lengths=(11, 6, 8, 9))
    separate = backend.eval_loss(make_batch([[e] for e in exs], 0))
    # Regression: gemma2 masks 5-D grouped scores; a 4-D mask broadcast across the batch when B > 1.
    packed = backend.eval_loss(make_batch([exs[:2], exs[2:]], 0))
    assert packed[1] == separate[1]
    assert packed[0] == pytest.approx(separate[0], rel=1e-5)
