"""common.peft: one acceptance rule for PEFT adapters, and one clean error for a broken one."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from common import peft
from common.errors import UserError


def write_adapter(d: Path, *, rank: int = 4, hidden: int = 64, layers: int = 2, targets=("q_proj", "o_proj"),
                  dora: bool = False, alpha: float = 8.0, **config_changes) -> Path:
    """A PEFT adapter that fits the tiny llama (hidden 64, 2 layers; v_proj is 64 -> 32), written by common.peft."""
    rng = np.random.default_rng(0)
    modules = {f"model.layers.{i}.self_attn.{t}": peft.AdapterModule(
        a=rng.standard_normal((rank, hidden), dtype=np.float32) * 0.1,
        b=rng.standard_normal((hidden, rank), dtype=np.float32) * 0.1,
        magnitude=(1 + rng.random(hidden, dtype=np.float32)) if dora else None, scale=alpha / rank, alpha=alpha)
        for i in range(layers) for t in targets}
    config = peft.config_for_modules(modules, base_model="tiny")
    config.update(config_changes)
    return peft.write_peft_adapter(d, peft.peft_tensors(modules), config)


def test_written_adapter_reads_back(tmp_path):
    d = write_adapter(tmp_path / "a")
    adapter = peft.load_adapter(d)
    assert sorted(adapter.deltas) == [f"model.layers.{i}.self_attn.{t}_proj.weight" for i in (0, 1) for t in "oq"]
    assert all(x.rank == 4 and x.scaling == 2.0 for x in adapter.deltas.values())
    modules = adapter.modules()
    assert modules["model.layers.1.self_attn.o_proj"].a.shape == (4, 64) and modules["model.layers.1.self_attn.o_proj"].scale == 2.0
    rs = peft.load_adapter(write_adapter(tmp_path / "rs", use_rslora=True))
    assert next(iter(rs.deltas.values())).scaling == pytest.approx(8.0 / math.sqrt(4))


@pytest.mark.parametrize(("change", "says"), [
    ({"peft_type": "IA3"}, "peft_type: 'IA3'"),
    ({"r": 8}, "rank 4, but adapter_config.json gives r = 8"),
    ({"lora_alpha": -3}, "lora_alpha: -3"),
    ({"r": float("nan")}, "r: nan"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern: {'q_proj': 'x'}"),
    ({"use_dora": True}, "use_dora is true but lora_magnitude_vector is missing"),
    ({"use_dora": "yes"}, "use_dora: 'yes' (needs true or false)"),
    ({"target_modules": ["k_proj"]}, "is not among target_modules"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
])
def test_acceptance_rule_names_file_and_key(tmp_path, change, says):
    d = write_adapter(tmp_path / "a", **change)
    with pytest.raises(UserError) as err:
        peft.load_adapter(d)
    text = err.value.render()
    assert says in text and (str(d / peft.CONFIG) in err.value.message or str(d / peft.WEIGHTS) in err.value.message)


def test_consumers_refuse_what_they_cannot_apply(tmp_path):
    from common.export.lora_gguf import _refuse_unsupported

    dora = peft.load_adapter(write_adapter(tmp_path / "dora", dora=True))
    assert dora.use_dora and all(x.magnitude for x in dora.deltas.values())
    with pytest.raises(UserError, match=r"DoRA: base_model\.model\.model\.layers\.0\.self_attn\.o_proj\.lora_magnitude_vector"):
        _refuse_unsupported(dora)
    conv1d = peft.load_adapter(write_adapter(tmp_path / "conv", fan_in_fan_out=True))  # merge applies it
    with pytest.raises(UserError, match="Conv1D layout"):
        conv1d.modules()


def test_truncated_or_garbage_weights_name_the_file(tmp_path):
    d = write_adapter(tmp_path / "a")
    w = d / peft.WEIGHTS
    whole = w.read_bytes()
    w.write_bytes(whole[:-100])
    with pytest.raises(UserError, match=rf"{w}: truncated: tensor '.+' ends at data byte \d+ but the file holds \d+"):
        peft.load_adapter(d)
    w.write_bytes(b"\x0f\x00\x00\x00\x00\x00\x00\x00" + b'{"a": {"x": 1}}')  # JSON, but no dtype
    with pytest.raises(UserError, match=rf"{w}: not a readable safetensors file"):
        peft.load_adapter(d)


# ---------------------------------------------------------------------------
# the commands on a run whose adapter is broken


@pytest.fixture()
def tiny_run(tiny_model_dir, tmp_path):
    run = tmp_path / "runs" / "tiny"
    write_adapter(run / "adapter")
    (run / "config.json").write_text(json.dumps({"model": str(tiny_model_dir), "backend": "torch",
                                                 "base_model": {"path": str(tiny_model_dir)}}))
    return run


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# Arguments that get each command past its other checks on the tiny run, to where it reads the adapter.
COMMANDS = {"eval": ["--data", "t.jsonl"], "merge": [], "export": ["--pre", "gpt-2", "--no-verify"],
            "export-adapter-only": ["--pre", "gpt-2", "--no-verify", "--adapter-only"]}


@pytest.mark.torch
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("broken", ["weights", "config"])
def test_broken_adapter_is_one_error_line_and_nothing_written(tiny_run, tmp_path, monkeypatch, capsys, command, broken):
    # guards against: `cannot reshape array of size 231 into shape (64,4)`, SafetensorError and JSONDecodeError
    # tracebacks, and export leaving an empty RUN/export/ folder behind
    from common.cli import main

    f = tiny_run / "adapter" / (peft.WEIGHTS if broken == "weights" else peft.CONFIG)
    f.write_bytes(f.read_bytes()[: -100 if broken == "weights" else 30])
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert main([command.split("-")[0], str(tiny_run), *COMMANDS[command]]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(f) in errors[0], err
    assert "Traceback" not in err and "reshape" not in err
    assert ("truncated" if broken == "weights" else "invalid JSON") in errors[0]
    assert _tree(tmp_path) == before  # every file byte-identical, no export/ or merged/ folder
