"""The model card of a pushed run (README.md), written with huggingface_hub's card classes.

Metadata (YAML front matter): ``base_model``, ``library_name`` (``peft`` for an adapter,
``transformers`` for a merged model, ``gguf`` for a GGUF), ``tags`` and a ``model-index``
with the run's eval results. The body: what was trained on what, the data fingerprint,
the hyper-parameters, the eval table and how to use it (peft, transformers, Ollama).
Pure: it reads plain dicts and returns text.
"""

from __future__ import annotations

from typing import Any

# Run config keys shown as hyper-parameters, in this order.
HYPER = ("backend", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps",
         "weight_decay", "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora",
         "targets", "num_layers", "load_in_4bit", "max_seq_length", "packing", "train_on_prompt", "seed")
# metrics.json keys reported in the card's table and model-index: (key, label, model-index metric type)
EVAL_METRICS = (("intent_accuracy", "intent accuracy", "accuracy"), ("intent_macro_f1", "intent macro-F1", "f1"),
                ("exact_match", "exact match", "exact_match"), ("parse_rate", "JSON parse rate", "parse_rate"),
                ("schema_valid_rate", "schema-valid rate", "schema_valid_rate"),
                ("eval_loss", "eval loss (nats/token)", "loss"), ("perplexity", "perplexity", "perplexity"))

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Training

- base model: {{ base_line }}
- data: {{ data_line }}
- result: {{ result_line }}

| hyper-parameter | value |
|---|---|
{{ hyper_rows }}
{{ system_block }}
## Evaluation

{{ eval_block }}

## Use

{{ usage }}
"""


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:g}"
    return "-" if v is None else str(v)


def eval_results(repo: str, metrics: dict[str, Any], dataset: str):
    """huggingface_hub EvalResult entries (the model-index) for the numbers in ``metrics``."""
    from huggingface_hub import EvalResult

    out = []
    for key, label, kind in EVAL_METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and value == value:  # skip None and NaN
            out.append(EvalResult(task_type="text-generation", task_name="Text Generation",
                                  dataset_type="json", dataset_name=dataset, dataset_split="test",
                                  metric_type=kind, metric_name=label, metric_value=round(float(value), 6)))
    return out


def usage(what: str, repo: str, base: str | None, gguf_name: str | None) -> str:
    if what == "adapter":
        return ("```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained({repo!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({(base or repo)!r})\n```\n\n"
                f"or with llm-ft: `llm-ft models import-adapter` / `huggingface-cli download {repo}`.")
    if what == "merged":
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({repo!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo!r})\n```")
    name = repo.split("/")[-1].lower()
    quant = (gguf_name or "").rsplit("-", 1)[-1].removesuffix(".gguf").upper() or "latest"
    return ("With Ollama, straight from the Hub:\n\n"
            f"```sh\nollama run hf.co/{repo}:{quant}\n```\n\n"
            "or with the Modelfile written by training (it carries the system prompt, template and stops):\n\n"
            f"```sh\nhuggingface-cli download {repo} --local-dir {name}\n"
            f"cd {name} && ollama create {name} -f Modelfile && ollama run {name}\n```")


def render(*, repo: str, what: str, base: str | None, base_revision: str | None, run_config: dict[str, Any],
           summary: dict[str, Any], fingerprint: dict[str, Any], eval_report: dict[str, Any] | None,
           system_prompt: str | None, gguf_name: str | None = None, extra_tags: list[str] | None = None) -> str:
    """The card's text (README.md): YAML metadata + markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    metrics = (eval_report or {}).get("metrics") or {}
    library = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[what]
    tags = ["llm-ft", "lora", "sft", "text-generation"] + (["peft"] if what == "adapter" else []) + \
        (["gguf", "ollama"] if what == "gguf" else []) + list(extra_tags or [])
    data_name = str((eval_report or {}).get("data") or "test split").replace("\\", "/").split("/")[-1]
    evals = eval_results(repo, metrics, dataset=data_name) if metrics else None
    data = ModelCardData(base_model=base, library_name=library, tags=tags, pipeline_tag="text-generation",
                         model_name=repo.split("/")[-1], eval_results=evals or None)
    rows = "\n".join(f"| {k} | {_value(run_config[k])} |" for k in HYPER if k in run_config)
    counts = ", ".join(f"{s} {fingerprint[s]['rows']}" for s in ("train", "valid", "test")
                       if isinstance(fingerprint.get(s), dict))
    sha = str(fingerprint.get("sha256", ""))[:16]
    data_line = f"{counts or 'unknown'} rows (content sha256 {sha or '?'})"
    best = summary.get("best_eval_loss")
    result_line = (f"{summary.get('steps', '?')} steps ({summary.get('stop_reason', '?')}), best eval loss "
                   f"{best:.4f} at step {summary.get('best_step')}" if isinstance(best, (int, float))
                   else f"{summary.get('steps', '?')} steps")
    if metrics:
        shown = [(label, metrics[key]) for key, label, _ in EVAL_METRICS if isinstance(metrics.get(key), (int, float))]
        eval_block = ("| metric | value |\n|---|---|\n" + "\n".join(f"| {label} | {v:.4g} |" for label, v in shown) +
                      f"\n\non {metrics.get('n', '?')} rows of `{data_name}`")
    else:
        eval_block = "Not evaluated yet (`llm-ft eval RUN` before pushing adds this table)."
    system_block = (f"\nSystem prompt used in training (prepend it at inference):\n\n```text\n{system_prompt}\n```\n"
                    if system_prompt else "")
    kind = {"adapter": "A LoRA adapter", "merged": "A model (LoRA merged into its base)",
            "gguf": "A GGUF for llama.cpp and Ollama"}[what]
    base_line = f"[{base}](https://huggingface.co/{base})" + (f" at revision `{base_revision}`" if base_revision else "") \
        if base else "a local model (not on the Hub)"
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, title=repo.split("/")[-1],
        summary=f"{kind} fine-tuned with [llm-ft](https://pypi.org/project/llm-ft/) "
                f"on {base or 'a local base model'}.",
        base_line=base_line, data_line=data_line, result_line=result_line, hyper_rows=rows,
        system_block=system_block, eval_block=eval_block, usage=usage(what, repo, base, gguf_name))
    return str(card)
