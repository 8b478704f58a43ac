"""Load a base model with transformers and attach LoRA / DoRA / rsLoRA with peft (QLoRA too)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.options import TrainConfig, memory_mode
from torch_ft.device import Precision

QLORA_ALTERNATIVES = ("on a Mac, use --backend mlx (MLX trains on a 4-bit base on Apple Silicon); "
                      "elsewhere, drop --load-in-4bit (a LoRA on the full-precision base) or use an NVIDIA/ROCm GPU")


def attention_implementation(prec: Precision, packing: bool, choice: str = "auto") -> str:
    """``choice``, or for "auto": variable-length Flash-Attention (torch's ``varlen_attn``) on NVIDIA
    GPUs in half precision (packed examples attend only to themselves, padding costs nothing); else
    flash-attention 2 for packing where installed; SDPA everywhere else."""
    from torch_ft import attention

    usable = attention.usable(prec.device, prec.dtype)
    if choice == "varlen":
        if not usable:
            raise UserError("--attention varlen: needs an NVIDIA GPU, --dtype bfloat16/float16 and torch >= 2.10 "
                            f"(this run: {prec.device}, {prec.dtype_name}, torch {torch.__version__})",
                            ["use --attention auto (SDPA where varlen is unavailable)"])
        return attention.register()
    if choice != "auto":
        return choice
    if usable:
        return attention.register()
    if (packing and prec.kind == "cuda" and prec.dtype != torch.float32
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa"


def _quantization_config(cfg: TrainConfig, prec: Precision):
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    bits = 4 if cfg.load_in_4bit else 8
    if prec.kind not in ("cuda", "rocm"):
        raise UserError(f"--load-in-{bits}bit: {bits}-bit bases (bitsandbytes) need a CUDA or ROCm GPU, "
                        f"and this run is on {prec.device}", [QLORA_ALTERNATIVES])
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--load-in-{bits}bit needs bitsandbytes: pip install 'llm-ft[torch]' "
                        "(or pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    # QLoRA (Dettmers et al. 2023): nf4 storage, double quantisation of the scales, half compute.
    compute = prec.dtype if prec.dtype != torch.float32 else torch.bfloat16
    # Under --fsdp the packed 4-bit weights are stored in bf16-typed tensors so FSDP can shard them.
    storage = {"bnb_4bit_quant_storage": torch.bfloat16} if cfg.fsdp else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, **storage)


def load_base(model_dir: Path, cfg: TrainConfig, prec: Precision):
    """The frozen base model on ``prec.device`` in ``prec.dtype`` (or 4/8-bit with bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    quant = _quantization_config(cfg, prec)
    attn = attention_implementation(prec, cfg.packing, cfg.attention)
    kwargs: dict[str, Any] = dict(dtype=prec.dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code,
                                  attn_implementation=attn)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": prec.device.index or 0}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for reading 20 local tensors is noise in the training log
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except OSError as exc:
        raise UserError(f"{model_dir}: cannot load the model: {exc}",
                        ["only safetensors weights are loaded (pickled .bin files are refused)"]) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{model_dir}: this model needs its own code; pass --trust-remote-code if you trust it") from None
        raise
    finally:
        hf_logging.enable_progress_bar()
    if quant is None and not cfg.fsdp:  # under --fsdp, fully_shard moves each rank's shard to its device
        model.to(prec.device)
    model.config.use_cache = False  # no KV cache while training (generation turns it on per call)
    for p in model.parameters():
        p.requires_grad_(False)
    mode = memory_mode(cfg)
    if quant is not None:
        # Not peft's prepare_model_for_kbit_training: it casts every weight that is not quantised
        # (embedding, lm_head, norms) to fp32, 2 GiB more on an 8B model, and its fp32 norms promote
        # the hidden states (6 GiB more activations than bf16 on a 4096-token row: bench/RESULTS.md).
        # They stay in the compute dtype, as in a bf16 LoRA (and one dtype per FSDP unit).
        model.enable_input_require_grads()
    if mode == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "offload":
        from torch_ft import offload

        offload.enable(model)
    return model


def checkpoint_every(model, every: int) -> tuple[int, int]:
    """Gradient checkpointing on every ``every``-th decoder layer only; (layers checkpointed, layers)."""
    layers = [m for m in getattr(model.get_decoder(), "layers", []) if hasattr(m, "gradient_checkpointing")]
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.23 does the selection itself
        enable({"use_reentrant": False}, every_n_layers=every)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % every == 0  # as transformers picks them
    return sum(1 for m in layers if m.gradient_checkpointing), len(layers)


def linear_names(model) -> list[str]:
    """Short names of the linear layers inside the transformer blocks (lm_head excluded)."""
    head = model.get_output_embeddings()
    names: list[str] = []
    for full, module in model.named_modules():
        # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear, so QLoRA bases count too.
        if isinstance(module, torch.nn.Linear) and module is not head:
            short = full.split(".")[-1]
            if short not in names:
                names.append(short)
    return names


def lora_config(model, cfg: TrainConfig):
    """A peft LoraConfig for ``cfg``: targets filtered to those the model has, layers counted from the top."""
    from peft import LoraConfig

    present = linear_names(model)
    if "all-linear" in cfg.targets:
        targets = present
    else:
        targets = [t for t in cfg.targets if t in present]
    if not targets:
        raise UserError(f"--targets {','.join(cfg.targets)}: none of these modules exist in this model",
                        [f"linear layers present: {', '.join(present)}"])
    layers = None
    if cfg.num_layers is not None:
        total = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        if not 1 <= cfg.num_layers <= total:
            raise UserError(f"--num-layers {cfg.num_layers}: the model has {total} layers")
        layers = list(range(total - cfg.num_layers, total))
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                      layers_to_transform=layers)


def attach_lora(model, cfg: TrainConfig, seed: int):
    """Wrap ``model`` with a LoRA adapter initialised from ``seed`` (A: Kaiming uniform, B: zeros)."""
    from peft import get_peft_model

    config = lora_config(model, cfg)
    torch.manual_seed(seed)  # seeds CPU and every GPU: the adapter's init depends on the seed only
    # autocast_adapter_dtype keeps the LoRA weights fp32 over a bf16/fp16 base.
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    return peft_model, sorted(config.target_modules)  # peft keeps a set: sorted, the same order every run
