"""mlx-lm adapters -> PEFT (llm-ft models import-adapter), and the PEFT config helpers.

The mlx-lm adapter is made by mlx-lm's own code (linear_to_lora_layers, then saved the
way its trainer saves: trainable parameters to adapters.safetensors + save_config).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from common.adapters import convert_mlx_lm_adapter, peft_targets, read_peft_adapter
from common.errors import UserError

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

IDS = [[5, 17, 42, 99, 3, 250, 7, 61]]


def make_mlx_lm_adapter(model_dir, out, *, dora: bool, num_layers: int = 1, rank: int = 4, scale: float = 10.0):
    """An adapter as ``mlx_lm.lora`` writes it; returns mlx-lm's logits with the adapter on."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, save_config

    mx.random.seed(0)
    model, _ = load_model(model_dir)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    rng = np.random.default_rng(1)
    for _, m in model.named_modules():  # stand-in for training: B (and DoRA's m) off their init
        if hasattr(m, "lora_b"):
            m.lora_b = mx.array(rng.normal(0, 0.05, m.lora_b.shape).astype(np.float32))
            if dora:
                m.m = m.m * mx.array(rng.uniform(0.9, 1.1, m.m.shape).astype(np.float32))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config({"model": str(model_dir), "fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers,
                 "lora_parameters": params, "iters": 10, "learning_rate": 1e-5}, out / "adapter_config.json")
    model.eval()
    return np.array(model(mx.array(IDS)).astype(mx.float32))


@pytest.mark.torch
@pytest.mark.parametrize("dora", [False, True])
def test_mlx_lm_adapter_converts_to_peft_with_the_same_logits(tiny_model_dir, tmp_path, dora):
    from test_mlx_support import torch_peft_logits

    src = tmp_path / "mlx-adapter"
    mlx_logits = make_mlx_lm_adapter(tiny_model_dir, src, dora=dora)
    out = convert_mlx_lm_adapter(src, tmp_path / "peft")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["lora_alpha"] == pytest.approx(40.0)  # alpha / r == mlx-lm's scale 10
    assert config["use_dora"] is dora and config["use_rslora"] is False
    assert config["layers_to_transform"] == [1]  # num_layers=1 of 2: only the last block
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    src_w = mx.load(str(src / "adapters.safetensors"))
    modules, _ = read_peft_adapter(out)
    q = modules["model.layers.1.self_attn.q_proj"]
    np.testing.assert_array_equal(q.a, np.array(src_w["model.layers.1.self_attn.q_proj.lora_a"]).T)
    np.testing.assert_array_equal(q.b, np.array(src_w["model.layers.1.self_attn.q_proj.lora_b"]).T)

    torch_logits = torch_peft_logits(tiny_model_dir, out, IDS)
    np.testing.assert_allclose(torch_logits, mlx_logits, atol=2e-4, rtol=1e-4)


def test_converted_adapter_loads_into_the_mlx_backend(tiny_model_dir, tmp_path):
    from test_mlx_support import mlx_backend

    src = tmp_path / "mlx-adapter"
    mlx_logits = make_mlx_lm_adapter(tiny_model_dir, src, dora=False, num_layers=2, rank=2, scale=3.0)
    out = convert_mlx_lm_adapter(src, tmp_path / "peft", base_model="tiny-base")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-base"
    backend = mlx_backend(tiny_model_dir)  # r=4, alpha=8: the adapter's r=2 rebuilds the layers
    base_logits = np.array(backend.logits(IDS))
    backend.load_adapter(out)
    ours = np.array(backend.logits(IDS))
    np.testing.assert_allclose(ours, mlx_logits, atol=1e-5, rtol=1e-5)
    assert np.abs(ours - base_logits).max() > 1e-3  # the adapter really changes the model


def test_import_adapter_command(tiny_model_dir, tmp_path, capsys):
    from common.cli import main
    from mlx_ft.import_adapter import main_import_adapter

    src = tmp_path / "a"
    make_mlx_lm_adapter(tiny_model_dir, src, dora=False)
    assert main(["models", "import-adapter", str(src)]) == 0
    assert sorted(p.name for p in (tmp_path / "a-peft").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    assert "lora_alpha=40" in capsys.readouterr().out
    assert main_import_adapter(argparse.Namespace(dir=src, out=tmp_path / "b", base_model="x")) == 0
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "x"
    # a user error: one message, exit status 2, no traceback
    assert main(["models", "import-adapter", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "Traceback" not in err


def test_import_adapter_rejects_what_is_not_an_mlx_lm_adapter(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        convert_mlx_lm_adapter(tmp_path / "missing")
    d = tmp_path / "full"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    with pytest.raises(UserError, match="fine_tune_type 'full'"):
        convert_mlx_lm_adapter(d)
    (d / "adapter_config.json").write_text('{"fine_tune_type": "lora",\n "lora_parameters": }')
    with pytest.raises(UserError, match=r"adapter_config.json:2: invalid JSON"):
        convert_mlx_lm_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4, "scale": 2.0}}))
    mx.save_safetensors(str(d / "adapters.safetensors"), {"model.layers.0.mlp.up_proj.lora_a": mx.zeros((8, 4)),
                                                          "model.layers.0.mlp.up_proj.weight": mx.zeros((4, 8))})
    with pytest.raises(UserError) as err:
        convert_mlx_lm_adapter(d)
    assert any("model.layers.0.mlp.up_proj.weight: not a LoRA tensor" in p for p in err.value.problems)
    assert any("needs both lora_A and lora_B" in p for p in err.value.problems)
    assert not (tmp_path / "full-peft").exists()  # nothing half-written


def test_peft_targets_are_exact():
    paths = [f"model.layers.{i}.self_attn.{m}" for i in (2, 3) for m in ("q_proj", "v_proj")]
    assert peft_targets(paths) == (["q_proj", "v_proj"], [2, 3])
    # not leaf names x layers: full paths, which PEFT matches by suffix
    odd = paths[:3]
    assert peft_targets(odd) == (sorted(odd), None)
