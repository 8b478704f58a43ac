"""Merge: the formula checked numerically (LoRA, rsLoRA, DoRA), logits against transformers+peft,
bf16 handled without torch, peak memory of the streamed merge, and bad adapters refused.

``make_run`` (a run directory with a tiny model and a random PEFT adapter) is shared by the
export tests.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from common.export.merge import load_adapter, open_merged
from common.export.merge_cmd import MergeConfig, run, write_merged
from common.export.st_io import SafeTensorsModel, bf16_to_f32, f32_to_bf16

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
SYSTEM = "You are an intent classifier.\nAnswer with JSON only: {\"intent\": ...}"


def make_run(root: Path, arch: str = "llama", *, base: Path | None = None, r: int = 4, alpha: float = 8,
             use_dora: bool = False, use_rslora: bool = False, targets: list[str] | None = None,
             modules_to_save: list[str] | None = None, seed: int = 0, b_std: float = 0.05,
             dtype: str = "float32") -> Path:
    """A run directory: tiny base model, PEFT adapter with random non-zero B, config, system prompt."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny import make_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    root = Path(root)
    if base is None:
        base = root / "base"
        make_model(base, arch, seed=seed)
        if dtype != "float32":
            m = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
            m.save_pretrained(base, safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if targets is None:
        targets = PHI3_TARGETS if arch == "phi3" else SEVEN
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=use_dora, use_rslora=use_rslora,
                     modules_to_save=modules_to_save, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
    run_dir = root / "run"
    peft_model.save_pretrained(run_dir / "adapter", safe_serialization=True)
    (run_dir / "config.json").write_text(json.dumps({"model": str(base), "base_model": {"path": str(base)},
                                                     "max_seq_length": 256}))
    (run_dir / "system_prompt.txt").write_text(SYSTEM, encoding="utf-8")
    return run_dir


def peft_logits(base: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    """Logits of the base model with the adapter applied by peft (unmerged), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2) / np.mean(b ** 2))


IDS = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64]


# ---------------------------------------------------------------------------
# the formula


@pytest.mark.torch
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_formula(tmp_path, use_rslora):
    run_dir = make_run(tmp_path, r=4, alpha=8, use_rslora=use_rslora)
    base = SafeTensorsModel(tmp_path / "base")
    adapter = load_adapter(run_dir / "adapter")
    merged = open_merged(tmp_path / "base", run_dir / "adapter")
    name = "model.layers.1.self_attn.k_proj.weight"
    key = "base_model.model.model.layers.1.self_attn.k_proj"
    A = adapter.file.float32(f"{key}.lora_A.weight")
    B = adapter.file.float32(f"{key}.lora_B.weight")
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    expected = base.float32(name) + (B @ A) * scale
    np.testing.assert_allclose(merged.float32(name), expected, rtol=1e-6, atol=1e-7)
    assert np.abs(B @ A).max() > 1e-3  # the adapter is not a no-op
    # tensors the adapter does not touch come through bit for bit
    np.testing.assert_array_equal(merged.float32("model.norm.weight"), base.float32("model.norm.weight"))


@pytest.mark.torch
def test_dora_matches_peft_merge(tmp_path):
    """W' = m / ||W + sBA||_row * (W + sBA), compared with peft's own merge_and_unload."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = make_run(tmp_path, use_dora=True)
    merged = open_merged(tmp_path / "base", run_dir / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
                                      run_dir / "adapter").merge_and_unload()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        np.testing.assert_allclose(merged.float32(name), sd[name], rtol=1e-5, atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_merged_logits_match_peft(tmp_path, kind):
    from transformers import AutoModelForCausalLM  # noqa: F401  (torch extra present)

    run_dir = make_run(tmp_path, use_dora=kind == "dora", use_rslora=kind == "rslora")
    out = run(MergeConfig(run=str(run_dir)))
    assert out == run_dir / "merged"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    assert (out / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text())
    want = peft_logits(tmp_path / "base", run_dir / "adapter", IDS)
    got = peft_logits(out, None, IDS)
    base_only = peft_logits(tmp_path / "base", None, IDS)
    assert nmse(base_only, want) > 1e-4  # the adapter changes the model measurably
    assert nmse(got, want) < 1e-10


@pytest.mark.torch
@pytest.mark.parametrize("targets, modules_to_save", [(["q_proj", "embed_tokens"], None), (["v_proj"], ["lm_head"])])
def test_tied_embeddings_changed_on_one_side_are_untied(tmp_path, targets, modules_to_save):
    """peft applies an embedding LoRA to the input only (and a saved lm_head to the output only);
    the merge must not leak either change into the other side of the tied pair."""
    run_dir = make_run(tmp_path, targets=targets, modules_to_save=modules_to_save)
    if modules_to_save:  # make the saved head differ from the embedding, as training would
        from safetensors.numpy import load_file, save_file

        path = run_dir / "adapter" / "adapter_model.safetensors"
        tensors = load_file(path)
        key = next(k for k in tensors if k.endswith("lm_head.weight"))
        tensors[key] = tensors[key] * 1.5
        save_file(tensors, path)
    out = run(MergeConfig(run=str(run_dir)))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    want = peft_logits(tmp_path / "base", run_dir / "adapter", IDS)
    np.testing.assert_allclose(peft_logits(out, None, IDS), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# bf16 without torch, streaming


def test_bf16_round_trip():
    x = np.array([1.0, -2.5, 3.14159, 1e-8, 65504.0, np.inf, -np.inf], dtype=np.float32)
    bits = f32_to_bf16(x)
    back = bf16_to_f32(bits)
    np.testing.assert_allclose(back[:5], x[:5], rtol=2 ** -8)
    assert np.isinf(back[5:]).all()
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]
    # round to nearest even: 1 + 2^-8 is halfway between two bf16 values -> rounds to 1.0
    assert bf16_to_f32(f32_to_bf16(np.array([1 + 2 ** -8], np.float32)))[0] == 1.0


@pytest.mark.torch
def test_bf16_base_merges_in_fp32_and_stays_bf16(tmp_path):
    import torch
    from safetensors import safe_open

    run_dir = make_run(tmp_path, dtype="bfloat16")
    out = run(MergeConfig(run=str(run_dir), out=str(tmp_path / "m")))
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(out / "model.safetensors", "pt") as f:
        got = f.get_tensor(name)
    with safe_open(tmp_path / "base" / "model.safetensors", "pt") as f:
        base_w = f.get_tensor(name)
    assert got.dtype == torch.bfloat16
    adapter = load_adapter(run_dir / "adapter")
    key = "base_model.model.model.layers.0.mlp.up_proj"
    delta = adapter.file.float32(f"{key}.lora_B.weight") @ adapter.file.float32(f"{key}.lora_A.weight") * 2.0
    want = torch.from_numpy(base_w.float().numpy() + delta).to(torch.bfloat16)
    assert torch.equal(got, want)


def _synthetic_model(root: Path, n: int = 2048, layers: int = 3) -> tuple[Path, Path]:
    """A config-only 'model' with a few (n, n) fp32 tensors and a rank-8 adapter on each."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    save_file({f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((n, n), dtype=np.float32)
               for i in range(layers)}, base / "model.safetensors")
    ad = {}
    for i in range(layers):
        ad[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_A.weight"] = rng.standard_normal((8, n), dtype=np.float32)
        ad[f"base_model.model.model.layers.{i}.mlp.up_proj.lora_B.weight"] = rng.standard_normal((n, 8), dtype=np.float32)
    save_file(ad, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    return base, adapter


def test_streamed_merge_peak_memory(tmp_path):
    n = 2048
    base, adapter = _synthetic_model(tmp_path, n)
    merged = open_merged(base, adapter)
    tensor_bytes = n * n * 4
    tracemalloc.start()
    write_merged(merged, tmp_path / "out", shard_bytes=tensor_bytes + 1, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * tensor_bytes, f"peak {peak / 2**20:.1f} MiB for {tensor_bytes / 2**20:.0f} MiB tensors"
    # shards of bounded size + an index that names every tensor
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    out = SafeTensorsModel(tmp_path / "out")
    a = load_adapter(adapter)
    key = "base_model.model.model.layers.2.mlp.up_proj"
    want = SafeTensorsModel(base).float32("model.layers.2.mlp.up_proj.weight") + 2.0 * (
        a.file.float32(f"{key}.lora_B.weight") @ a.file.float32(f"{key}.lora_A.weight"))
    np.testing.assert_allclose(out.float32("model.layers.2.mlp.up_proj.weight"), want, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------
# refusals


def test_adapter_that_does_not_fit_is_refused(tmp_path):
    base, adapter = _synthetic_model(tmp_path, n=64, layers=1)
    from safetensors.numpy import save_file

    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.ones((8, 32), np.float32),
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": np.ones((64, 8), np.float32),
               "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": np.ones((8, 64), np.float32),
               "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": np.ones((64, 8), np.float32)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(UserError) as exc:
        open_merged(base, adapter)
    text = exc.value.render()
    assert "do not fit base model.layers.0.mlp.up_proj.weight" in text
    assert "no base tensor 'model.layers.9.mlp.up_proj.weight'" in text


def test_quantized_base_is_refused(tmp_path):
    base, adapter = _synthetic_model(tmp_path, n=64, layers=1)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="full-precision"):
        open_merged(base, adapter)


def test_half_adapter_is_refused(tmp_path):
    base, adapter = _synthetic_model(tmp_path, n=64, layers=1)
    from safetensors.numpy import save_file

    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.ones((8, 64), np.float32)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(UserError, match="lora_A only"):
        load_adapter(adapter)
