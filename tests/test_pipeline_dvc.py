"""The DVC workflow on a copy of the project, with the micro configuration."""

import csv
import io
import json

import pytest

from conftest import MICRO_PARAMS, git_commit_all, run, set_params

pytestmark = pytest.mark.slow


def write_toy_preferences(repo):
    """A ready preference set: a micro model's samples all tie on sentiment."""
    rows = [{"prompt": f"Item {i} is", "chosen": " good and useful", "rejected": " bad and broken"}
            for i in range(40)]
    (repo / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**MICRO_PARAMS, "preferences.source": "file:prefs.jsonl",
            "preferences.heldout_fraction": 0.2}


def test_repro_noop_and_exp_rerun_scope(project_copy):
    set_params(project_copy, write_toy_preferences(project_copy))
    first = run(["dvc", "repro"], project_copy)
    stages = ("download", "tokenize", "pretrain", "finetune", "lora", "quantize", "preferences",
              "reward_model", "grpo")
    for stage in stages:
        assert f"Running stage '{stage}'" in first.stdout
        assert json.loads((project_copy / f"metrics/{stage}.json").read_text())
    assert (project_copy / "data/pretrain/model/model.safetensors").exists()
    assert not (project_copy / "data/pretrain/checkpoint/checkpoint.pt").exists()

    second = run(["dvc", "repro"], project_copy)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout

    git_commit_all(project_copy, "micro pipeline")
    exp = run(["dvc", "exp", "run", "-S", "tokenize.vocab_size=400"], project_copy)
    assert "Running stage 'download'" not in exp.stdout
    assert "Running stage 'tokenize'" in exp.stdout
    for downstream in stages[2:]:  # everything reads the new tokens, directly or not
        assert f"Running stage '{downstream}'" in exp.stdout
    assert json.loads((project_copy / "metrics/tokenize.json").read_text())["vocab_size"] == 400
    rows = list(csv.DictReader(io.StringIO(
        run(["dvc", "exp", "show", "--csv"], project_copy).stdout)))
    assert {"400", "512"} <= {row["tokenize.vocab_size"] for row in rows}


def test_failing_stage_reports_one_line(project_copy):
    set_params(project_copy, {**MICRO_PARAMS, "download.finetune.source": "file:/nonexistent.txt"})
    result = run(["dvc", "repro", "download"], project_copy, check=False)
    assert result.returncode != 0
    assert "error: file:/nonexistent.txt: file not found" in result.stderr
