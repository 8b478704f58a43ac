"""``--data`` from the datasets library: a folder saved with save_to_disk, parquet files, a Hub id.

All offline: the datasets are written here, and a Hub id that is not cached must fail with
one clear message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from common.data import load_splits  # noqa: E402
from common.rows import Conversation  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def jsonl_rows(name: str, n: int) -> list[dict]:
    lines = (REPO / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_save_to_disk_dict_gives_the_jsonl_rows(tmp_path):
    train, test = jsonl_rows("train", 12), jsonl_rows("test", 4)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "j" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    got = load_splits([str(tmp_path / "ds")], valid_fraction=0.25, seed=1)
    ref = load_splits([str(tmp_path / "j")], valid_fraction=0.25, seed=1)
    assert got.report.ok, got.report.errors
    for name in ("train", "valid", "test"):
        assert [r.messages for r in getattr(got, name)] == [r.messages for r in getattr(ref, name)]
    assert all(isinstance(r, Conversation) for r in got.train)
    assert got.report.formats[f"{tmp_path / 'ds'}[train]"] == "chat"
    assert str(got.test[0].source) == f"{tmp_path / 'ds'}[test]:1"


def test_parquet_folder_split_by_file_name_and_sampled(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list(jsonl_rows("train", 10)).to_parquet(str(folder / "train-00000.parquet"))
    datasets.Dataset.from_list(jsonl_rows("valid", 3)).to_parquet(str(folder / "validation.parquet"))
    got = load_splits([f"{folder}:6"], valid_fraction=0.1, seed=0)
    assert got.report.ok, got.report.errors
    assert (len(got.train), len(got.valid), len(got.test)) == (6, 3, 0) and not got.valid_from_train


def test_lint_names_the_dataset_row(tmp_path):
    rows = [{"prompt": "set a timer", "completion": "{\"intent\": \"set_timer\"}"},
            {"prompt": "", "completion": "x"},  # empty prompt
            {"completion": "y"}]  # no prompt (columnar: stored as a null prompt)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad"))
    got = load_splits([str(tmp_path / "bad")], valid_fraction=0.0001, seed=0)
    errors = "\n".join(got.report.errors)
    where = f"{tmp_path / 'bad'}[train]"
    assert f"{where}:2: prompt: empty content" in errors
    assert f"{where}:3: missing key 'prompt'" in errors
    datasets.Dataset.from_list([{"promt": "a", "completion": "b"}]).save_to_disk(str(tmp_path / "typo"))
    typo = load_splits([str(tmp_path / "typo")], valid_fraction=0.0001, seed=0).report.errors
    assert typo == [f"{tmp_path / 'typo'}[train]:1: missing key 'prompt' (found 'promt': did you mean 'prompt'?)"]


def test_text_and_null_columns(tmp_path):
    # columnar storage fills missing keys with null: a chat row with no "tools" must not be an error
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "tools": None}]
    datasets.Dataset.from_list(rows * 4).save_to_disk(str(tmp_path / "chat"))
    got = load_splits([str(tmp_path / "chat")], valid_fraction=0.25, seed=0)
    assert got.report.ok, got.report.errors
    assert len(got.train) == 3 and got.train[0].tools is None


def test_hub_id_not_cached_offline_is_one_message(tmp_path, monkeypatch, capsys):
    from common.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    assert main(["check-data", "nobody/no-such-dataset:train", "--no-tokens", "--system-prompt-file", ""]) == 2
    err = capsys.readouterr().err
    assert "nobody/no-such-dataset:train: cannot load the Hugging Face dataset" in err
    assert "Traceback" not in err


def test_check_data_on_a_parquet_folder(tmp_path, monkeypatch, capsys):
    from common.cli import main

    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list(jsonl_rows("train", 8)).to_parquet(str(folder / "train.parquet"))
    monkeypatch.chdir(tmp_path)
    assert main(["check-data", str(folder), "--no-tokens", "--system-prompt-file", ""]) == 0
    out = capsys.readouterr().out
    assert "chat" in out and "ok" in out
