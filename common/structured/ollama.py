"""The schema beside an export, and the exact Ollama requests that decode as ``eval --format`` measured.

Ollama's ``format`` takes a JSON schema and constrains decoding with a grammar made from it
(llama.cpp's conversion, the one ``--format`` uses on a GGUF here). ``llm-ft export`` writes
the run's schema to ``export/schema.json`` and prints the two ways to send it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from common import io
from common.structured.schema import load_format, mentions_schema, run_schema, top_keys


def ollama_usage(model: str, schema_file: Path, schema: dict[str, Any], prompt: str) -> str:
    """The ``ollama run --format`` command and the REST body with ``format`` (pure; golden-tested).

    ``ollama run --format`` takes a schema's text as well as ``json``: Ollama's CLI (cmd/cmd.go) quotes
    only the value ``json`` and sends any other as the raw JSON of the request's ``format``.
    """
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "format": schema, "stream": False,
            "options": {"temperature": 0}}
    return "\n".join([
        "decode as 'llm-ft eval --format schema' measured (Ollama's format = the JSON schema):",
        f"  ollama run {model} --format \"$(cat {shlex.quote(str(schema_file))})\" {shlex.quote(prompt)}",
        "  curl http://localhost:11434/api/chat -d @- <<'JSON'",
        "  " + json.dumps(body, ensure_ascii=False),
        "  JSON",
    ])


def export_schema(out_dir: Path, run_dir: Path | None, system: str | None, notes: list[str]) -> Path | None:
    """Copy the run's schema to ``out_dir/schema.json`` (atomically); note when the system prompt does not
    name the schema's fields (Ollama's docs advise giving the schema in the prompt too). None without one."""
    found = run_schema(run_dir) if run_dir is not None else None
    if found is None:
        return None
    fmt = load_format(found)
    dest = Path(out_dir) / "schema.json"
    io.write_json(dest, fmt.schema)
    if not mentions_schema(system, fmt.schema):
        keys = ", ".join(top_keys(fmt.schema))
        notes.append(f"warning: the system prompt does not mention the schema's fields ({keys}); Ollama advises "
                     "describing the JSON in the prompt as well as passing format")
    return dest
