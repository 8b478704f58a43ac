"""Memory preflight: the estimate's parts, what it suggests, and a check against a measured peak.

Measured on this project's 2-core Linux box (torch 2.13 CPU, transformers 5.23, peft 0.21.2;
SmolLM2-135M imported from the default GGUF, fp32, LoRA r=16 on all 7 projections, AdamW, random
tokens, the backend's chunked loss (torch_ft.loss) and its recompute of the MLP product
(torch_ft.lean_mlp) and, without checkpointing, of the norm outputs (torch_ft.norm_recompute);
peak = resource.getrusage(RUSAGE_SELF).ru_maxrss; the MEASURE script below with batch, length,
checkpointing and steps as arguments, 2026-12-06):

    batch x seq   checkpointing   steps   measured peak   estimate
    4 x 256       off             3       3010 MiB        3395 MiB  (+13%)
    4 x 256       on              2       2350 MiB        2144 MiB  (-9%)
    1 x 256       off             2       1638 MiB        1711 MiB  (+4%)
    2 x 256       off             2       2116 MiB        2435 MiB  (+15%)
    2 x 128       off             2       1630 MiB        1711 MiB  (+5%; the test below)

(Before the chunked loss and the recompute were counted, 4 x 256 measured 4768 MiB and 2818 MiB.)
The saved tensors alone (counted with torch.autograd.graph.saved_tensors_hooks) are about half of
the resident peak: glibc keeps freed temporaries' heap pages. With MALLOC_MMAP_THRESHOLD_=65536
the 4 x 256 checkpointed peak drops to 1770 MiB, which the estimate without its CPU slack
factor (1.9) predicts within 5%.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.archs import ARCHS
from common.backends import device_plan
from common.errors import UserError
from common.models import memory
from common.options import DEFAULT_TARGETS

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "tie_word_embeddings": True}
CPU = device_plan("torch", "cpu", "float32")
BASE = dict(plan=CPU, load_in_4bit=False, lora_r=16, targets=DEFAULT_TARGETS,
            batch_size=4, seq_len=256, grad_checkpoint=False)


def est(**changes):
    return memory.estimate_training_memory(SMOLLM2, **{**BASE, **changes})


def test_parts_follow_the_formulas():
    e = est()
    assert set(e.parts) == {"weights", "lora+adam", "activations", "logits", "overhead"}
    assert e.total_bytes == sum(e.parts.values())
    assert memory.Shape.from_config(SMOLLM2).parameter_count() == 134_515_008  # the GGUF's element count
    assert e.parts["weights"] == 134_515_008 * 4
    # r * (in + out) per adapted matrix, 30 layers, 16 bytes each (fp32 weight, grad, Adam m and v)
    per_layer = 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert e.parts["lora+adam"] == 30 * per_layer * 16
    # torch's loss builds fp32 logits one chunk of positions at a time: 2**25 values -> 682 of 49152
    assert CPU.loss_chunk_values == 2**25
    assert e.parts["logits"] == int(682 * 49152 * 4 * memory.LOGIT_COPIES * CPU.slack)
    whole = est(plan=dataclasses.replace(CPU, loss_chunk_values=None))
    assert whole.parts["logits"] == int(4 * 256 * 49152 * 4 * memory.LOGIT_COPIES * CPU.slack)
    assert est(batch_size=1, seq_len=100).parts["logits"] == int(100 * 49152 * 4 * memory.LOGIT_COPIES * CPU.slack)


def test_recomputed_intermediates_are_not_counted():
    """torch recomputes act(gate), act(gate)*up and (without checkpointing) both normalised inputs."""
    tokens, slack = 4 * 256, CPU.slack
    per_layer = lambda values: int(30 * tokens * values * 4 * slack)  # noqa: E731  (fp32, 30 layers)
    stored, lean = est(lean=False).parts["activations"], est().parts["activations"]
    assert stored - lean == pytest.approx(per_layer(2 * 1536 + 2 * 576), abs=2)
    ckpt_stored, ckpt = est(lean=False, grad_checkpoint=True), est(grad_checkpoint=True)
    assert ckpt_stored.parts["activations"] - ckpt.parts["activations"] == pytest.approx(
        int(tokens * 2 * 1536 * 4 * slack), abs=2)  # one layer recomputed at a time: its MLP product only
    mlx = device_plan("mlx", "cpu", "float32")
    assert not mlx.lean_layers and est(plan=mlx).total_bytes == est(plan=mlx, lean=False).total_bytes


@pytest.mark.parametrize("change", [{}, {"lora_dropout": 0.05}, {"use_dora": True}, {"fsdp": True},
                                    {"compile": "on"}])
def test_lean_allowed_follows_the_options_that_rule_it_out(change):
    from common.options import TrainConfig

    assert memory.lean_allowed(TrainConfig(**change)) is (not change)


def test_estimate_bounds_the_peaks_the_gpu_bench_measured():
    """H100 peaks of our 8B sides (bench/results, round 6) against the estimate for the same work: an
    upper bound, but not one that sends a run to a slower memory mode (bench/preflight_check.py)."""
    from bench import preflight_check

    rows = [r for path in preflight_check.DEFAULT for r in preflight_check.rows(path)]
    assert {r["mode"] for r in rows} == {"default", "offload"} and len(rows) >= 8
    for r in rows:
        assert 0.97 <= r["ratio"] <= 1.25, r


def test_each_lever_lowers_its_part():
    e = est()
    assert est(grad_checkpoint=True).parts["activations"] < e.parts["activations"] / 5
    whole = dataclasses.replace(CPU, loss_chunk_values=None)  # without a chunked loss, logits scale with the batch
    assert est(plan=whole, batch_size=2).parts["logits"] * 2 == pytest.approx(est(plan=whole).parts["logits"], rel=1e-6)
    assert est(batch_size=16).parts["logits"] == e.parts["logits"]  # chunked: one chunk, whatever the batch
    assert est(seq_len=128).parts["activations"] < e.parts["activations"]
    fewer = est(num_layers=10)
    assert fewer.parts["lora+adam"] * 3 == e.parts["lora+adam"] and fewer.parts["activations"] < e.parts["activations"]
    cuda_plan = device_plan("torch", "cuda", "bfloat16")
    cuda = est(plan=cuda_plan)
    nf4 = est(plan=cuda_plan, load_in_4bit=True)
    assert cuda_plan.can_quantize and not CPU.can_quantize  # bitsandbytes 4-bit needs CUDA
    assert nf4.parts["weights"] < cuda.parts["weights"] / 2  # linear layers at ~4.1 bits, embeddings at 16
    mlx4 = est(plan=device_plan("mlx", "gpu", "bfloat16"), load_in_4bit=True)
    assert mlx4.parts["weights"] < nf4.parts["weights"]  # MLX quantizes the (large) embedding too


def test_mlx_quantized_checkpoint_counts_packed_weights():
    q4 = {**SMOLLM2, "quantization": {"group_size": 64, "bits": 4}}
    gpu = device_plan("mlx", "gpu", "bfloat16")
    packed = memory.estimate_training_memory(q4, **{**BASE, "plan": gpu})
    assert packed.parts["weights"] == est(plan=gpu, load_in_4bit=True).parts["weights"]


def test_parameter_count_matches_safetensors_for_each_family(tmp_path):
    pytest.importorskip("torch")
    from tiny import make_model

    from common.models.catalog import parameter_count

    for arch, row in ARCHS.items():
        d = make_model(tmp_path / arch, arch, tie=row.hf_defaults["tie_word_embeddings"])
        cfg = json.loads((d / "config.json").read_text())
        assert memory.Shape.from_config(cfg).parameter_count() == parameter_count(d)[0], arch


def test_preflight_passes_or_explains_what_would_fit():
    assert memory.preflight(SMOLLM2, **BASE, limit_bytes=64 << 30).total_bytes == est().total_bytes
    with pytest.raises(UserError) as err:
        memory.preflight(SMOLLM2, **{**BASE, "batch_size": 8, "seq_len": 1024}, limit_bytes=8 << 30)
    text = err.value.render()
    assert err.value.message.startswith("training would need about ") and "7.2 GiB is available" in text
    fits = [line for line in text.splitlines() if "would fit:" in line]
    assert 1 <= len(fits) <= 3 and any("--grad-checkpoint" in f for f in fits)
    assert not any("4-bit" in f for f in fits)  # no bitsandbytes 4-bit on a CPU
    for line in fits:  # every suggestion states its own estimate, under the limit
        value = float(line.rsplit(": ", 1)[1].split()[0])
        assert value * (1 << 30) <= 8 * (1 << 30) * 0.9


def test_preflight_suggests_4bit_on_cuda():
    """Where the bf16 weights alone overflow the budget, a 4-bit base is the change that fits."""
    llama8b = {**SMOLLM2, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
               "tie_word_embeddings": False}
    with pytest.raises(UserError) as err:
        memory.preflight(llama8b, **{**BASE, "plan": device_plan("torch", "cuda", "bfloat16"), "batch_size": 1,
                                     "seq_len": 1024}, limit_bytes=14 << 30)
    fits = [line for line in err.value.render().splitlines() if "would fit:" in line]
    assert fits and all("--load-in-4bit" in line for line in fits)


def test_preflight_never_blocks_on_unknown_memory():
    huge = {**BASE, "batch_size": 512, "seq_len": 8192}
    assert memory.preflight(SMOLLM2, **huge, limit_bytes=0).total_bytes > 1 << 40


def test_available_memory_on_this_machine():
    available, where = memory.available_memory(CPU)
    assert available > 0 and ("RAM" in where or "unified" in where)


MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(2)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=sys.argv[2].split(",")))
    from torch_ft import lean_mlp, norm_recompute  # what the torch backend installs in its default mode
    from torch_ft.loss import supervised_loss  # and the chunked loss it trains with
    assert lean_mlp.install(model) and norm_recompute.install(model.get_base_model())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        (supervised_loss(model.get_base_model(), {"input_ids": ids}, torch.ones_like(ids))[0] / ids[:, 1:].numel()).backward()
        opt.step()
        opt.zero_grad()
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


@pytest.mark.slow
@pytest.mark.torch
def test_estimate_is_close_to_a_measured_peak(default_model):
    """Two LoRA steps of the real SmolLM2 at batch 2 x seq 128 on CPU, in a fresh process."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(default_model.path), ",".join(DEFAULT_TARGETS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    estimate = est(batch_size=2, seq_len=128).total_bytes
    print(f"measured peak {peak / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB")
    assert 0.75 < estimate / peak < 1.35, (estimate, peak)
