"""Property-based fuzz of the readers of untrusted files: the JSONL/JSON data loader, the YAML
and .env config, and the GGUF importer. Whatever the bytes, the only failure is a clean
``UserError`` (an ``error:`` line) or a problem listed in the data report, never another
exception. Bounded (a fixed number of examples, no deadline) so that it runs in CI."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from common.errors import UserError  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# JSON values shaped like our rows: the keys the formats look for, roles, nesting, odd scalars.
KEYS = st.sampled_from(["messages", "conversations", "role", "content", "from", "value", "instruction", "input",
                        "output", "prompt", "completion", "text", "tools", "system", "tool_calls", "name", "x"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", ""]), st.text(max_size=20))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(KEYS, inner, max_size=5)), max_leaves=30)
LINES = st.one_of(
    JSON_VALUES.map(json.dumps),
    st.integers(1, 300).map(lambda n: "[" * n + "]" * n),  # deep, within and past the limits
    st.integers(1, 5000).map(lambda n: '{"messages": ' + "[" * n),  # unclosed
    st.text(max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)


def _in_tmp(name: str, data: bytes) -> tuple[tempfile.TemporaryDirectory, Path]:
    tmp = tempfile.TemporaryDirectory(prefix="fuzz-")
    path = Path(tmp.name) / name
    path.write_bytes(data)
    return tmp, path


@FUZZ
@given(lines=st.lists(LINES, max_size=8), suffix=st.sampled_from(["train.jsonl", "train.json"]),
       crlf=st.booleans(), bom=st.booleans())
def test_data_loader_reports_never_raises(lines, suffix, crlf, bom):
    from common.data import load_splits

    text = ("\r\n" if crlf else "\n").join(lines)
    if suffix.endswith(".json") and lines and lines[0].startswith("{"):
        text = "[" + ",".join(lines) + "]"  # also a JSON array now and then
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")
    tmp, path = _in_tmp(suffix, data)
    with tmp:
        splits = load_splits([str(path)], valid_fraction=0.2, seed=0)
        for problem in splits.report.errors:
            assert problem.startswith((str(path), ": ")), problem  # every problem names the file


YAML_TEXT = st.one_of(
    st.text(max_size=80),
    st.dictionaries(st.one_of(st.sampled_from(["data", "max_seq_length", "seed", "valid_fraction", "overlong",
                                               "tokens", "paths", "max-seq-length", "nope"]), st.text(max_size=8)),
                    JSON_VALUES, max_size=5).map(lambda d: json.dumps(d)),  # JSON is YAML
    st.sampled_from(["a: &x [*x]", "!!python/object:os.system {}", "a: !!binary zz", "? [a]\n: 1", "- 1\n- 2",
                     "a: 1\na: 2", "{a: [b, {c: d}]}", "max_seq_length: 1e999", "seed: .nan", "data: ~"]),
)


@FUZZ
@given(text=YAML_TEXT, raw=st.booleans())
def test_yaml_config_only_user_errors(text, raw):
    from common.check_data import CheckDataConfig
    from common.config import resolve

    data = text.encode("utf-8", "surrogatepass") if not raw else text.encode("utf-16")
    tmp, path = _in_tmp("config.yaml", data)
    with tmp:
        try:
            resolve(CheckDataConfig, {}, str(path), cwd=Path(tmp.name))
        except UserError:
            pass


ENV_LINES = st.one_of(
    st.tuples(st.sampled_from(["LLM_FT_SEED", "LLM_FT_MAX_SEQ_LENGTH", "LLM_FT_DATA", "LLM_FT_OVERLONG",
                               "LLM_FT_TOKENS", "LLM_FT_NOPE", "HF_TOKEN", "WHATEVER", "export LLM_FT_SEED"]),
              st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=40),
)


@FUZZ
@given(lines=st.lists(ENV_LINES, max_size=6), encoding=st.sampled_from(["utf-8", "utf-16", "latin-1"]))
def test_env_file_only_user_errors(lines, encoding):
    from common.check_data import CheckDataConfig
    from common.config import resolve

    tmp, path = _in_tmp(".env", "\n".join(lines).encode(encoding, "replace"))
    saved = dict(os.environ)
    with tmp:
        try:
            resolve(CheckDataConfig, {}, None, str(path), cwd=Path(tmp.name))
        except UserError:
            pass
        finally:  # a .env may set library variables in os.environ
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(scope="module")
def gguf_bytes(tiny_model_dir, tmp_path_factory) -> bytes:
    from gguf_tiny import write_tiny_gguf

    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf").read_bytes()


@pytest.mark.torch
@FUZZ
@given(data=st.data())
def test_gguf_import_only_user_errors(gguf_bytes, data):
    from common.models.gguf_import import import_gguf

    blob = bytearray(gguf_bytes)
    header_end = min(len(blob), 4096)  # the header (metadata, tensor infos) lies in the first KBs
    for _ in range(data.draw(st.integers(0, 6), label="edits")):
        at = data.draw(st.integers(0, header_end - 1), label="at")
        blob[at] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(blob))), label="truncate")
    if cut is not None:
        del blob[cut:]
    tmp, path = _in_tmp("fuzz.gguf", bytes(blob))
    saved = os.environ.get("LLM_FT_HOME")
    os.environ["LLM_FT_HOME"] = str(Path(tmp.name) / "home")
    try:
        with tmp:
            try:
                out = import_gguf(path)
            except UserError:
                return
            assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    finally:
        if saved is None:
            os.environ.pop("LLM_FT_HOME", None)
        else:
            os.environ["LLM_FT_HOME"] = saved
