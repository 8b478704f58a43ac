"""README's "Multi-GPU, multi-node, multi-Mac" commands, run as written (the one-machine ones).

The block is read from README.md; each command that runs on one machine is executed through bash
with $MODEL set to the tiny model and options appended only to keep it small (2 steps).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tiny_run import REPO, copy_data  # noqa: E402

pytestmark = [pytest.mark.torch]

SMALL = "--max-steps 2 --batch-size 1 --lora-r 4 --eval-every 0 --save-every 0 --sample-prompts 0 --max-seq-length 256"
LOCAL = ("llm-ft train", "torchrun --nproc-per-node", "mlx.launch -n")  # the rest need other machines


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Multi-GPU, multi-node, multi-Mac", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_readme_lists_single_and_multi_node_commands():
    cmds = readme_commands()
    assert any("--nnodes 2" in c and "--master-addr" in c for c in cmds)
    assert any(c.startswith("mlx.launch --hosts") for c in cmds)
    assert sum(c.startswith(LOCAL) for c in cmds) == 4
    assert any("--fsdp" in c for c in cmds if c.startswith(LOCAL))


@pytest.mark.parametrize("index", range(4))
def test_readme_command_runs(index, tiny_model_dir, tmp_path):
    cmd = [c for c in readme_commands() if c.startswith(LOCAL)][index]
    if cmd.startswith("mlx.launch"):
        pytest.importorskip("mlx.core")
        extra = SMALL
    else:
        extra = SMALL + " --device cpu"
    copy_data(tmp_path / "data", train=8, valid=2, test=0)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLX_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MODEL=str(tiny_model_dir),
               PATH=venv_bin + os.pathsep + env.get("PATH", ""))
    proc = subprocess.run(["bash", "-c", f"{cmd} {extra}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / shlex.split(cmd)[shlex.split(cmd).index("--out") + 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in rows if r["event"] == "train"] == [2, 2]
