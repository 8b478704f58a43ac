"""llm-ft: fine-tune chat LLMs with LoRA and ship them to Ollama.

`common` is the backend-free layer: config, data, prompts, models, the training
loop, evaluation and export. It never imports torch or mlx at module level.
"""

__version__ = "0.1.0"
