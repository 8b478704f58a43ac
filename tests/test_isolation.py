"""`common/` works with torch and mlx absent: every module imports, and check-data runs.

The backend packages (torch_ft, mlx_ft) are blocked too: common reaches them only through
the registry's lazy lines (common.backends), never by an import of its own.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import importlib, json, pkgutil, sys

    BLOCKED = ("torch", "mlx", "mlx_lm", "torch_ft", "mlx_ft")

    class Blocker:  # behaves as if the backends were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_isolation)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    import common

    imported, failed = ["common"], []
    for mod in pkgutil.walk_packages(common.__path__, "common."):
        if mod.name == "common.__main__":  # importing it runs the CLI; common.cli is imported instead
            continue
        try:
            importlib.import_module(mod.name)
            imported.append(mod.name)
        except Exception as exc:
            failed.append(f"{mod.name}: {type(exc).__name__}: {exc}")

    from common.check_data import CheckDataConfig, run
    code = run(CheckDataConfig(paths=[sys.argv[1]], tokens=False, system_prompt_file=None))
    from common import backends
    from common.errors import UserError
    try:  # asking for a backend that is not there is one clear error, not a traceback
        backends.load_backend("auto")
        asked = "loaded"
    except UserError as exc:
        asked = str(exc)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"imported": imported, "failed": failed, "code": code, "leaked": leaked, "asked": asked}))
""")


def test_common_imports_and_check_data_runs_without_torch_mlx_or_backend_packages(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(5)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == []
    on_disk = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in (ROOT / "common").rglob("*.py") if p.name != "__main__.py"}
    assert on_disk <= set(result["imported"])  # nothing skipped (e.g. a folder without __init__.py)
    assert {"common.data", "common.data_formats", "common.check_data", "common.config", "common.prompts"} <= set(
        result["imported"])
    assert result["code"] == 0 and result["leaked"] == []
    assert "the torch backend is not installed" in result["asked"] and "pip install" in result["asked"]


# The one framework import left in common/: tensorboard's writer ships inside torch (--report-to tensorboard).
LAZY_ALLOWED = {("common/train/metrics.py", "torch.utils.tensorboard")}


def test_common_holds_no_framework_code_even_lazily():
    # Guards the backend split: framework code (torch, mlx, torch_ft, mlx_ft) lives in the backend packages,
    # which common reaches only through common.backends' registry strings.
    import ast

    found = set()
    for path in (ROOT / "common").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                if name.split(".")[0] in ("torch", "mlx", "mlx_lm", "torch_ft", "mlx_ft"):
                    found.add((path.relative_to(ROOT).as_posix(), name))
    assert found <= LAZY_ALLOWED, sorted(found - LAZY_ALLOWED)
