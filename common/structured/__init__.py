"""Structured output: answers constrained to a JSON schema (Ollama's ``format``), and a classifier's confidence.

- :mod:`.schema`: the schema behind ``--format``, its enum (classifier) field and fallback value.
- :mod:`.constraint`: the schema compiled by llguidance (torch, MLX) or llama.cpp (GGUF), and a
  framework-free token hook the engines call in their sampling loop.
- :mod:`.confidence`: each allowed enum value's probability, exactly, from the model's log-probs.
- :mod:`.calibration`: expected calibration error, reliability diagram, accuracy at coverage.
- :mod:`.classify`: ``classify(texts) -> [(value, probability, json)]`` for notebooks and scripts.
"""

from common.structured.classify import Classifier, classify
from common.structured.schema import AnswerFormat, EnumField, load_format, resolve_format

__all__ = ["AnswerFormat", "Classifier", "EnumField", "classify", "load_format", "resolve_format"]
