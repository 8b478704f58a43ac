"""examples/quickstart.ipynb (through nbclient) and examples/quickstart.py run on the default model,
one training step and two test rows each, so they never rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.torch, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parent.parent


def example_env(default_model, out: Path) -> dict[str, str]:
    env = dict(os.environ, LLM_FT_EXAMPLE_MODEL=str(default_model.path), LLM_FT_EXAMPLE_DATA=str(REPO / "data"),
               LLM_FT_EXAMPLE_OUT=str(out), LLM_FT_EXAMPLE_STEPS="1", LLM_FT_EXAMPLE_ROWS="2",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def test_notebook_runs(default_model, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for k, v in example_env(default_model, tmp_path / "run").items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "train rows: 348" in text and "gguf:" in text and "->" in text
    assert (tmp_path / "run" / "export" / "model-q8_0.gguf").is_file()
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file()


def test_script_runs(default_model, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")], cwd=tmp_path,
                          env=example_env(default_model, tmp_path / "run"), capture_output=True, text=True,
                          timeout=1100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train rows: 348" in proc.stdout and "adapter:" in proc.stdout and "->" in proc.stdout
    assert (tmp_path / "run" / "export" / "Modelfile").is_file()
