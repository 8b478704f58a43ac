"""The option groups shared by subcommands, and the training configuration composed of them.

Every default, help text and valid range lives here (or in a subcommand's own dataclass);
the CLI flags, ``--print-config`` and ``configs/*.yaml`` are generated from these classes.
Each group is a typed dataclass with a ``GROUP`` title (its section in ``--help``);
:class:`TrainConfig` inherits them all, so its fields and flags stay flat (``cfg.lora_r``,
``--lora-r``), and :func:`part` hands a backend one group as its own typed object.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, TypeVar

from common.backends import BackendName
from common.config import opt, register
from common.preference_options import PreferenceOptions
from common.prompts import TEMPLATE_NAMES

SMALL_MODEL_PARAMS = 1_000_000_000  # below this, the default learning rate is SMALL_MODEL_LR
SMALL_MODEL_LR = 5e-4
DPO_LR = 2e-5  # --method dpo: moves probability between two near answers; data/README.md measured 1e-4 hurting
DEFAULT_LR = 2e-4
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelOptions:
    GROUP = "model"
    model: str = opt("default", "base model: a Hugging Face Hub id, a local HF directory, a .gguf file, "
                     "or 'default' (the embedded SmolLM2-135M-Instruct)")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of --model")
    trust_remote_code: bool = opt(False, "allow models that need their own Python code (runs code from the model repo)",
                                  cli_only=True)


@dataclass
class DataOptions:
    GROUP = "data"
    data: list[str] = opt(factory=lambda: ["data"], help="data directory (train/valid/test.jsonl), files, a folder "
                          "of parquet/arrow files or a Hugging Face dataset id (user/name[:split]); several "
                          "sources are a comma list, each as PATH or PATH:N (N rows sampled)")
    data_config: str | None = opt(None, "configuration (subset) of a Hugging Face dataset given to --data")
    system_prompt_file: str | None = opt("system_prompt.txt", "system prompt inserted into rows that have none "
                                            "(and written to the Modelfile's SYSTEM); empty to use none")
    chat_template: str | None = opt(None, "override the tokenizer's chat template: a named template "
                                       f"({TEMPLATE_NAMES}) or a .jinja file")
    max_seq_length: int = opt(1024, "maximum tokens per example", min=1)
    overlong: Literal["truncate", "drop", "error"] = opt("truncate", "what to do with rows longer than --max-seq-length "
                                                         "(always counted and reported)")
    valid_fraction: float = opt(0.1, "fraction of train held out for validation when there is no valid file",
                                min=0, lt=1)
    json_schema: str | None = opt(None, "JSON schema every assistant answer must satisfy "
                                     "(default: schema.json beside the data, if present)")
    train_on_prompt: bool = opt(False, "also compute the loss on system/user tokens")
    seed: int = opt(3407, "random seed (data order, splits, adapter initialisation)", min=0)


@dataclass
class LoRAOptions:
    GROUP = "LoRA"
    lora_r: int = opt(16, "LoRA rank", min=1)
    lora_alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --use-rslora)",
                            gt=0)
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", min=0, lt=1)
    targets: list[str] = opt(factory=lambda: list(DEFAULT_TARGETS), help="module names to adapt "
                             "(those the architecture lacks are skipped; 'all-linear' adapts every linear layer)")
    num_layers: int | None = opt(None, "adapt only the last N transformer layers (default: all)", min=1)
    use_dora: bool = opt(False, "weight-decomposed LoRA (DoRA)")
    use_rslora: bool = opt(False, "rank-stabilised LoRA scaling alpha/sqrt(r)")


@dataclass
class OptimizerOptions:
    GROUP = "optimiser"
    lr: float | None = opt(None, "peak learning rate (default: 2e-4; 5e-4 for models under 1B "
                              "parameters, which need larger steps to learn a task in a few epochs; 2e-5 for "
                              "--method dpo, whose pairs need small steps)", gt=0)
    optim: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = opt("adamw", "optimizer (8-bit ones need bitsandbytes)")
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", min=0)
    warmup_steps: int = opt(10, "linear warmup steps", min=0)
    schedule: Literal["linear", "cosine", "constant"] = opt("linear", "learning-rate decay after warmup")


@dataclass
class LoopOptions:
    GROUP = "training loop"
    epochs: float = opt(2.0, "passes over the training data (ignored when --max-steps is set)", gt=0)
    max_steps: int | None = opt(None, "optimizer steps to run (overrides --epochs)", min=1)
    batch_size: int = opt(4, "examples per micro-batch", min=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", min=1)
    eval_every: int = opt(50, "evaluate on the validation split every N optimizer steps (0: only at the end)", min=0)
    eval_batches: int | None = opt(None, "limit each evaluation to N batches (default: the whole split)", min=1)
    sample_prompts: int = opt(2, "validation prompts to generate an answer for at each evaluation", min=0)
    early_stop_patience: int | None = opt(None, "stop after N evaluations without improvement", min=1)
    nonfinite: Literal["skip", "abort"] = opt("skip", "on a NaN/inf loss or gradient: skip the step or stop the run")
    resume: bool = opt(False, "continue from the newest verified checkpoint in --out")
    allow_partial_resume: bool = opt(False, "resume even if the optimizer state is missing")
    allow_global_batch_change: bool = opt(False, "resume with another global batch (batch size x grad accum x "
                                          "processes) than the checkpoint's")


@dataclass
class MemoryOptions:
    GROUP = "memory and speed"
    load_in_4bit: bool = opt(False, "QLoRA: 4-bit base (bitsandbytes nf4 on CUDA; MLX's 4-bit on a Mac)")
    load_in_8bit: bool = opt(False, "8-bit base (MLX's 8-bit on a Mac; bitsandbytes int8 on CUDA)")
    grad_checkpoint: bool = opt(False, "gradient checkpointing: less memory, ~30% slower (= --memory-mode checkpoint)")
    memory_mode: Literal["auto", "default", "checkpoint", "offload"] = opt(
        "auto", "default: keep activations (fastest); checkpoint: recompute each layer in backward, keeping only its "
        "input; offload: checkpoint and keep those inputs in pinned CPU memory, copied asynchronously (torch on a "
        "GPU; Unsloth's use_gradient_checkpointing=\"unsloth\"); auto: default (checkpoint with --grad-checkpoint), "
        "or with --max-memory the fastest that fits")
    max_memory: str | None = opt(None, "memory budget for training, e.g. 16GB, 16GiB or 12000MB: the preflight "
                                 "picks the fastest --memory-mode that fits it and stops before loading if none does")
    packing: bool = opt(False, "pack several examples per row, padding-free, no attention across examples")
    group_by_length: bool = opt(True, "batch rows of similar length together (less padding)")


@dataclass
class DeviceOptions:
    GROUP = "backend and device"
    backend: BackendName = opt("auto", "training backend; auto = MLX on Apple Silicon when "
                                                  "installed, else PyTorch")
    device: str | None = opt(None, "torch device (cuda, cuda:1, mps, cpu); default: the best available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "compute dtype; auto = bf16 on GPUs that "
                                                                   "support it, fp16 on older GPUs, fp32 on CPU")
    nproc: int = opt(1, "data-parallel processes on this machine: re-runs this command under torchrun (torch) or "
                     "mlx.launch (mlx), one per GPU; each takes --batch-size x --grad-accum per step", min=1)
    fsdp: bool = opt(False, "torch, under --nproc or torchrun: shard the frozen base over the processes (FSDP2, "
                     "each holds 1/N of it) for bases that do not fit one GPU; the LoRA weights stay whole on each")


@dataclass
class TorchOptions:
    GROUP = "torch backend"
    attention: Literal["auto", "varlen", "sdpa", "eager"] = opt(
        "auto", "attention kernel of the torch backend: auto = variable-length Flash-Attention on NVIDIA GPUs "
        "in bf16/fp16 (each example attends only to itself, no padding work), SDPA elsewhere")
    kernels: Literal["auto", "liger", "native", "off"] = opt(
        "auto", "fused kernels of the torch backend on NVIDIA GPUs: auto = Liger's RMSNorm/SwiGLU/RoPE for models "
        "of hidden size >= 4096 where liger-kernel is installed (pip install 'llm-ft[cuda]'), else torch's own "
        "fused RMSNorm (native)")
    compile: Literal["auto", "on", "off"] = opt(
        "off", "torch.compile each transformer layer of the torch backend on an NVIDIA GPU (auto: where there "
        "is one): fused kernels, less memory; the first step pays ~1-2 min of compilation")


@dataclass
class OutputOptions:
    GROUP = "output"
    out: str | None = opt(None, "run directory (default: runs/<model>-<timestamp>)")
    save_every: int = opt(100, "write a checkpoint every N optimizer steps (0: only at the end)", min=0)
    keep: int = opt(3, "checkpoints to keep (the newest; the last verified one is never deleted)", min=1)
    log_every: int = opt(1, "log the training loss every N optimizer steps", min=1)
    report_to: list[Literal["none", "wandb", "tensorboard"]] = opt(
        factory=list, help="experiment trackers: none, wandb, tensorboard (extras llm-ft[wandb], "
        "llm-ft[tensorboard]); metrics.jsonl is always written")
    run_name: str | None = opt(None, "run name shown by the trackers (default: the run directory's name)")
    wandb_project: str | None = opt(None, "W&B project (default: $WANDB_PROJECT, else W&B's own default)")


# Base classes list in reverse: a dataclass orders inherited fields from the last base to the
# first, so fields (and --help sections) read model, data, LoRA, optimiser, loop, memory, ...
@register
@dataclass
class TrainConfig(OutputOptions, TorchOptions, DeviceOptions, MemoryOptions, LoopOptions, OptimizerOptions,
                  PreferenceOptions, LoRAOptions, DataOptions, ModelOptions):
    """Everything ``llm-ft train`` takes: the option groups above, flat."""

    @property
    def peak_lr(self) -> float:
        """The learning rate to use: ``lr``, or the general default when it was left unset."""
        return self.lr if self.lr is not None else DEFAULT_LR

    def validate(self) -> list[str]:
        """Checks between fields (each field's own range comes from its ``opt`` metadata)."""
        problems = []
        if self.valid_fraction == 0:  # check-data accepts 0 (no hold-out); a training run needs a validation split
            problems.append("valid_fraction: must be in (0, 1) for training, got 0")
        if self.load_in_4bit and self.load_in_8bit:
            problems.append("load_in_4bit and load_in_8bit: choose one")
        problems += memory_mode_problems(self)
        if self.early_stop_patience is not None and self.eval_every == 0:
            problems.append("early_stop_patience: needs periodic evaluation (set --eval-every N > 0)")
        return problems + self.preference_problems()


def memory_mode_problems(cfg) -> list[str]:
    """--memory-mode against --grad-checkpoint, --backend and --max-memory's spelling."""
    problems = []
    if cfg.grad_checkpoint and cfg.memory_mode == "default":
        problems.append("memory_mode: default keeps activations, but --grad-checkpoint asks to recompute them: "
                        "choose one")
    if cfg.memory_mode == "offload" and cfg.backend == "mlx":
        problems.append("memory_mode: offload is for the torch backend on a GPU (MLX shares memory with the CPU): "
                        "use checkpoint")
    if cfg.max_memory is not None:
        from common.models.memory import parse_size

        try:
            parse_size(cfg.max_memory, "max_memory")
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def memory_mode(cfg) -> str:
    """The memory mode a config trains in: "default", "checkpoint" or "offload" ("auto" before a budget chose)."""
    if cfg.memory_mode != "auto":
        return cfg.memory_mode
    return "checkpoint" if cfg.grad_checkpoint else "default"


G = TypeVar("G")


def part(cfg, group: type[G]) -> G:
    """One option group of ``cfg`` as its own typed object, e.g. ``part(cfg, TorchOptions).kernels``."""
    return group(**{f.name: getattr(cfg, f.name) for f in fields(group)})
