"""The memory preflight per process of a data-parallel job (common.models.ranks): plain data
parallelism needs the whole base per process, --fsdp 1/N of the decoder layers plus what is
gathered; processes on one CPU or Mac share its memory. Pure arithmetic on config.json shapes."""

from __future__ import annotations

import pytest

from common.backends import device_plan
from common.errors import UserError
from common.models import memory
from common.models.ranks import RankLayout
from common.options import DEFAULT_TARGETS

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "tie_word_embeddings": False}
GPU = device_plan("torch", "cuda", "bfloat16")
CPU = device_plan("torch", "cpu", "float32")
KW = dict(plan=GPU, load_in_4bit=False, lora_r=16, targets=DEFAULT_TARGETS, batch_size=1, seq_len=2048,
          grad_checkpoint=True)


def weights(**kw) -> int:
    return memory.estimate_training_memory(LLAMA_70B, **{**KW, **kw}).parts["weights"]


def test_plain_data_parallelism_holds_the_whole_base_per_process():
    assert weights(ranks=RankLayout(8)) == weights()


def test_fsdp_holds_a_shard_plus_the_gathered_root_and_two_layers():
    hidden, layers, vocab = 8192, 80, 128256
    layer = 2 * (hidden * (hidden + 2 * 1024 + hidden) + 3 * hidden * 28672 + 2 * hidden)  # bf16 bytes
    root = 2 * (2 * vocab * hidden + hidden)  # embeddings and head (untied) and the final norm
    assert weights() == layers * layer + root
    expected = layers * layer / 8 + root + 2 * layer * 7 / 8
    assert weights(ranks=RankLayout(8, fsdp=True)) == pytest.approx(expected, rel=1e-6)
    assert weights(ranks=RankLayout(8, fsdp=True)) < weights() / 5  # 131 GiB -> 22.6 GiB per GPU
    assert weights(ranks=RankLayout(1, fsdp=True)) == weights()  # one process: nothing to shard over


def test_processes_on_the_cpu_share_its_memory():
    small = {**LLAMA_70B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}
    kw = {**KW, "plan": CPU, "grad_checkpoint": False, "seq_len": 256}
    one = memory.estimate_training_memory(small, **kw).total_bytes
    limit = int(one * 1.5)  # room for one process, not two
    assert memory.assess(small, **kw, limit_bytes=limit, ranks=RankLayout(1)).fits
    two = memory.assess(small, **kw, limit_bytes=limit, ranks=RankLayout(2))
    assert not two.fits and "shared by 2 processes" in two.where
    # torchrun's LOCAL_WORLD_SIZE: 2 nodes of 1 process each do not share
    assert memory.assess(small, **kw, limit_bytes=limit, ranks=RankLayout(2, local=1)).fits
    # a GPU is each process's own
    assert RankLayout(8).sharing(GPU) == 1 and RankLayout(8).sharing(CPU) == 8


def test_the_preflight_suggests_fsdp_when_the_base_does_not_fit_one_gpu():
    with pytest.raises(UserError) as err:
        memory.preflight(LLAMA_70B, **KW, limit_bytes=80 << 30, ranks=RankLayout(8))
    assert "(--fsdp)" in err.value.render()
    memory.preflight(LLAMA_70B, **KW, limit_bytes=80 << 30, ranks=RankLayout(8, fsdp=True))  # fits: no error


def test_models_info_nproc(tiny_model_dir, capsys):
    from common.models.cmd import ModelsInfoConfig, run_info

    run_info(ModelsInfoConfig(model=str(tiny_model_dir), backend="torch", device="cpu", nproc=2, fsdp=True))
    out = capsys.readouterr().out
    assert "per process of 2 (FSDP" in out and "shared by 2 processes" in out
    with pytest.raises(UserError, match="give their number with --nproc"):
        run_info(ModelsInfoConfig(model=str(tiny_model_dir), backend="torch", device="cpu", fsdp=True))
