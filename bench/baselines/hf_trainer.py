"""Baselines B0 and B1: a Hugging Face ``Trainer`` + peft LoRA, fed exactly our data order.

B0 is the seeds' recipe: ``Trainer`` + peft, every micro-batch right-padded to its longest
row, full-vocabulary logits and Hugging Face's cross-entropy, gradient checkpointing on
(as the seeds ran it), SDPA attention. B1 is the best Hugging Face setup we could
assemble without extra compiled packages: padding-free flattening
(``DataCollatorWithFlattening``: one row per step, ``position_ids`` restarting per
example, which transformers turns into a block-diagonal mask), SDPA attention, Liger
kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) where the ``liger-kernel``
wheel is installed, fused AdamW, and no gradient checkpointing unless asked.

"seeds" is the seeds' recipe to the letter: micro-batches of 2 examples, each padded to its
longer one, 4 micro-batches accumulated per optimizer step (8 examples), GC on or off; it
takes the plan's examples in order, so its steps are not ours and get no per-step loss check.
A caller may pass a ready ``model`` (e.g. Unsloth's, bench.baselines.unsloth_side), trained
the B1 way (flattened rows) by the same loop.

B0 and B1 get the same examples per optimizer step as our run (``plan``: example indices per
step), the same LoRA (rank, alpha, targets, dropout, initialisation seed), a constant
learning rate with no warmup (the two libraries' warmup formulas differ by one step),
the same clipping; so per-step losses are comparable with ours.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench.common import Side
from common.rows import Example


def _labels(ex: Example) -> list[int]:
    return [t if m else -100 for t, m in zip(ex.input_ids, ex.loss_mask, strict=False)]


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict:
    """B0: right-pad to the longest example; labels -100 on prompt and padding."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    att = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    lab = [_labels(e) + [-100] * (width - len(e.input_ids)) for e in examples]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(att), "labels": torch.tensor(lab)}


def collate_flat(examples: Sequence[Example]) -> dict:
    """B1: transformers' padding-free flattening (one row, position_ids restart per example)."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_tensors="pt")(
        [{"input_ids": e.input_ids, "labels": _labels(e)} for e in examples])


class _Steps:
    """A map-style dataset whose item i is step i's collated batch (collation runs in the timed loop)."""

    def __init__(self, examples, plan, variant, pad_id):
        self.examples, self.plan, self.variant, self.pad_id = examples, plan, variant, pad_id

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict:
        exs = [self.examples[j] for j in self.plan[i]]
        return collate_flat(exs) if self.variant == "B1" else collate_padded(exs, self.pad_id)


SEEDS_MICRO, SEEDS_ACCUM = 2, 4  # the seeds' per_device_train_batch_size and gradient_accumulation_steps


def seeds_plan(plan: list[list[int]]) -> list[list[int]]:
    """The plan's examples in order, cut into the seeds' micro-batches of 2 (whole steps of 4 of them only)."""
    flat = [j for idx in plan for j in idx]
    per_step = SEEDS_MICRO * SEEDS_ACCUM
    flat = flat[:len(flat) // per_step * per_step]
    return [flat[i:i + SEEDS_MICRO] for i in range(0, len(flat), SEEDS_MICRO)]


def load_model(model_dir, *, dtype, device, load_in_4bit: bool, grad_checkpoint: bool, attn: str = "sdpa"):
    """The base model as the seeds loaded it (4-bit nf4 with double quantisation for QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if not load_in_4bit:
        model.to(device)
    model.config.use_cache = False
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpoint,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def run(model_dir, examples: Sequence[Example], plan: list[list[int]], *, variant: str, lora: dict, lr: float,
        max_grad_norm: float, seed: int, device: str, dtype: str, grad_checkpoint: bool, pad_id: int,
        load_in_4bit: bool = False, liger: bool | None = None, label: str | None = None, model=None) -> Side:
    """Train ``len(plan)`` optimizer steps with the Trainer; returns the measured :class:`Side`.

    ``lora``: r, alpha, dropout, targets (module names). ``dtype``: "float32" or "bfloat16".
    ``model``: a ready LoRA model (its loading is then the caller's, after its own peak reset),
    trained with flattened rows. Peak memory is CUDA's max_memory_allocated since before the
    model was loaded (CPU: the caller measures the process's max RSS).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    assert variant in ("B0", "B1", "seeds"), variant
    cuda = device.startswith("cuda")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    prebuilt = model is not None
    if cuda and not prebuilt:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if liger is None:
        liger = variant == "B1" and cuda and not prebuilt and importlib.util.find_spec("liger_kernel") is not None
    if not prebuilt:
        model = load_model(model_dir, dtype=torch_dtype, device=device, load_in_4bit=load_in_4bit,
                           grad_checkpoint=grad_checkpoint)
        config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                            target_modules=list(lora["targets"]), bias="none", task_type="CAUSAL_LM")
        torch.manual_seed(seed)  # the same adapter initialisation as ours (peft draws A in module order)
        model = get_peft_model(model, config)
        if grad_checkpoint:
            model.enable_input_require_grads()
    after_setup = int(torch.cuda.memory_allocated()) if cuda else None
    seeds = variant == "seeds"
    steps_plan = plan
    if seeds:  # micro-batches, SEEDS_ACCUM of them per optimizer step
        plan = seeds_plan(plan)
        steps_plan = [sum(plan[i:i + SEEDS_ACCUM], []) for i in range(0, len(plan), SEEDS_ACCUM)]
    side = Side(label or {"B0": "B0 Trainer+peft, padded", "B1": "B1 Trainer+peft, flattened",
                          "seeds": "seeds' recipe, Trainer+peft, 2 x 4 padded"}[variant])
    losses: list = []
    marks: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()  # one sync per step, as our backend's float(loss) does
            marks.append(time.perf_counter())

    data = _Steps(examples, plan, variant, pad_id)

    class PlanTrainer(Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=0)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch, **kw)
            losses.append((out[0] if return_outputs else out).detach())
            return out

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=len(steps_plan), per_device_train_batch_size=1,
            gradient_accumulation_steps=SEEDS_ACCUM if seeds else 1,
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=max_grad_norm, logging_steps=10**9, save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True, seed=seed, data_seed=seed, bf16=dtype == "bfloat16",
            use_cpu=not cuda, gradient_checkpointing=grad_checkpoint and not load_in_4bit and not prebuilt,
            gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0,
            dataloader_pin_memory=False, remove_unused_columns=False, use_liger_kernel=bool(liger))
        trainer = PlanTrainer(model=model, args=args, train_dataset=data, callbacks=[Timer()])
        trainer.train()
        optim_name = str(args.optim)
    side.step_times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    for s, idx in enumerate(steps_plan):
        micro = plan[s * SEEDS_ACCUM:(s + 1) * SEEDS_ACCUM] if seeds else [idx]
        side.tokens.append(sum(len(examples[j].input_ids) for j in idx))
        side.computed.append(side.tokens[-1] if variant == "B1" else
                             sum(len(m) * max(len(examples[j].input_ids) for j in m) for m in micro))
    # a step's loss: with accumulation, the Trainer's micro-batch losses are each scaled by the step's
    # target count (num_items_in_batch), so they add up to the step's mean token loss
    per = SEEDS_ACCUM if seeds else 1
    side.losses = [float(sum(losses[i:i + per])) for i in range(0, len(losses), per)]
    if len(side.losses) != len(steps_plan) or len(side.step_times) != len(steps_plan):
        raise RuntimeError(f"{side.label}: expected {len(steps_plan)} steps, got {len(side.step_times)} timings and "
                           f"{len(side.losses)} losses")
    if cuda:
        side.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
        side.memory_kind = "cuda max allocated"
        side.extra["memory_parts"] = {"after_setup": after_setup, "after_steps": int(torch.cuda.memory_allocated()),
                                      "peak_allocated": side.peak_memory_bytes,
                                      "peak_reserved": int(torch.cuda.max_memory_reserved())}
    side.settings = {"variant": variant, "collator": "DataCollatorWithFlattening" if variant == "B1" else
                     "pad to longest (right)", "attention": "sdpa", "liger_kernel": bool(liger),
                     "micro_batch": SEEDS_MICRO if seeds else "the step's examples",
                     "gradient_accumulation_steps": SEEDS_ACCUM if seeds else 1,
                     "gradient_checkpointing": grad_checkpoint, "dtype": dtype, "load_in_4bit": load_in_4bit,
                     "optim": optim_name, "lr": lr, "lr_scheduler": "constant", "max_grad_norm": max_grad_norm,
                     "lora": dict(lora), "seed": seed, "torch_threads": torch.get_num_threads()}
    if any(not math.isfinite(x) for x in side.losses):
        side.extra["nonfinite_losses"] = True
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return side
