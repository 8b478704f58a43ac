"""MLX vs PyTorch: the same tiny weights, the same adapter start, the same batches.

Per-step losses agree within 1e-3 relative over 12 optimizer steps (AdamW with bias
correction on both sides), and adapters cross over: one trained on MLX gives the same
logits in transformers + peft, and a peft adapter gives the same logits on MLX.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_mlx_support import batches, examples, mlx_backend, randomize_b, torch_peft_logits, train_config

pytestmark = [pytest.mark.mlx, pytest.mark.torch]
mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

IDS = [[5, 17, 42, 99, 3, 250, 7, 61, 12, 300]]


def torch_backend(model_dir, **kw):
    from torch_ft.backend import TorchBackend

    torch.set_num_threads(1)
    b = TorchBackend()
    b.setup(model_dir, train_config(**kw), 0)
    return b


@pytest.mark.parametrize("kw", [
    {"max_grad_norm": 0.02},  # clipping active on every step
    {"use_dora": True, "use_rslora": True, "weight_decay": 0.01, "num_layers": 1, "lora_alpha": 3.0,
     "targets": ["q_proj", "v_proj", "down_proj"], "max_grad_norm": 0.0},  # 0 = no clipping
], ids=["lora-clipped", "dora-rslora-wd-last-layer"])
def test_loss_curves_agree(tiny_model_dir, tmp_path, kw):
    max_norm = kw.pop("max_grad_norm")
    mlx = mlx_backend(tiny_model_dir, **kw)
    randomize_b(mlx)  # B != 0 so every parameter gets a gradient from step 1
    mlx.save_adapter(tmp_path / "init", "tiny")
    mlx.load_adapter(tmp_path / "init")
    pt = torch_backend(tiny_model_dir, **kw)
    pt.load_adapter(tmp_path / "init")

    micro = batches(examples())
    total = sum(b.n_supervised for b in micro)
    clipped = 0
    for step in range(12):
        losses = []
        for backend in (mlx, pt):
            loss = sum(backend.forward_backward(b, 1.0 / total) for b in micro)
            stats = backend.optimizer_step(5e-3 * (1 + step % 3), max_norm)
            losses.append((loss, stats.grad_norm))
        (lm, gm), (lt, gt) = losses
        assert lm == pytest.approx(lt, rel=1e-3), f"step {step}: mlx {lm} torch {lt}"
        assert gm == pytest.approx(gt, rel=1e-3), f"step {step}: grad norm mlx {gm} torch {gt}"
        clipped += 0 < max_norm < gm
    assert clipped == (12 if max_norm else 0)
    for d in ("mlx", "torch"):
        (tmp_path / d).mkdir()
    mlx.save_adapter(tmp_path / "mlx", "tiny")
    pt.save_adapter(tmp_path / "torch", "tiny")
    from test_mlx_support import adapter_arrays

    a, b = adapter_arrays(tmp_path / "mlx"), adapter_arrays(tmp_path / "torch")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-4, err_msg=k)


def test_mlx_trained_adapter_gives_the_same_logits_in_peft(tiny_model_dir, tmp_path):
    mlx = mlx_backend(tiny_model_dir, use_dora=True, num_layers=1)
    micro = batches(examples(3))
    for _ in range(3):
        for b in micro:
            mlx.forward_backward(b, 0.05)
        mlx.optimizer_step(2e-2, 1.0)
    mlx.save_adapter(tmp_path / "a", "tiny")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["layers_to_transform"] == [1]
    ours = np.array(mlx.logits(IDS))
    theirs = torch_peft_logits(tiny_model_dir, tmp_path / "a", IDS)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_peft_adapter_gives_the_same_logits_on_mlx(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = model.eval()(input_ids=torch.tensor(IDS)).logits.numpy()

    mlx = mlx_backend(tiny_model_dir)  # r=4 on 7 targets: rebuilt to the adapter's r=8 on 3
    mlx.load_adapter(tmp_path / "peft")
    np.testing.assert_allclose(np.array(mlx.logits(IDS)), theirs, atol=1e-4, rtol=1e-4)
    mlx.save_adapter(tmp_path / "again", "tiny")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (again["r"], again["lora_alpha"], again["use_rslora"]) == (8, 4.0, True)  # alpha preserved under rsLoRA
    assert sorted(again["target_modules"]) == ["k_proj", "o_proj", "up_proj"]


def test_rope_theta_from_transformers5_config(tmp_path):
    """Regression: mlx-lm read no rope_theta from transformers 5's rope_parameters and used 10000."""
    from tiny import make_model

    d = make_model(tmp_path / "m", "llama", seed=3)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    cfg.pop("rope_theta", None)
    (d / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(IDS)).logits.numpy()
    mlx = mlx_backend(d)
    np.testing.assert_allclose(np.array(mlx.logits(IDS)), theirs, atol=1e-4, rtol=1e-4)
