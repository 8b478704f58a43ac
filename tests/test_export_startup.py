"""``llm-ft export --no-verify`` never imports torch (transformers' AutoConfig and AutoTokenizer do:
seconds of every export's start), and what it writes without them is byte for byte what it writes
through them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.export import hf_config
from common.export.cmd import ExportConfig, run
from common.models import hf_tokenizer

REPO = Path(__file__).resolve().parent.parent
PRE = {"qwen2": "qwen2"}  # the tiny tokenizer loads with Qwen2's regex in a qwen2 directory (test_export_gguf.PRE)
# Runs the CLI, then says whether torch was imported on the way.
PROBE = ("import sys\nfrom common.cli import main\nrc = main(sys.argv[1:])\n"
         "print('torch imported' if 'torch' in sys.modules else 'no torch')\nsys.exit(rc)")


@pytest.mark.torch
def test_export_without_verify_never_imports_torch(tmp_path):
    # Regression: AutoConfig (via configuration_utils) and AutoTokenizer (via tokenization_auto) import torch.
    from test_merge import make_run

    run_dir = make_run(tmp_path, r=4)
    out = tmp_path / "out" / "m.gguf"
    proc = subprocess.run([sys.executable, "-c", PROBE, "export", str(run_dir), "--no-verify", "--quant", "q8_0",
                           "--pre", "gpt-2", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "no torch", proc.stdout
    assert out.is_file() and (out.parent / "Modelfile").is_file()


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3"])
def test_gguf_equals_the_one_written_through_transformers(tmp_path, monkeypatch, arch):
    """The same GGUF and Modelfile when AutoConfig and AutoTokenizer decide (the readers' fallback)."""
    from test_merge import make_run

    run_dir = make_run(tmp_path, arch, r=4)
    outs = {}
    for label in ("ours", "transformers"):
        if label == "transformers":
            monkeypatch.setattr(hf_config, "read_hparams", lambda model_dir: None)
            monkeypatch.setattr(hf_tokenizer, "tokenizer_class", lambda model_dir: None)
        outs[label] = tmp_path / label / "m.gguf"
        run(ExportConfig(source=str(run_dir), quant="q8_0", out=str(outs[label]), pre=PRE.get(arch, "gpt-2"),
                         verify=False))
    assert outs["ours"].read_bytes() == outs["transformers"].read_bytes()
    assert (outs["ours"].parent / "Modelfile").read_text() == (outs["transformers"].parent / "Modelfile").read_text()
