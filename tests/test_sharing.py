"""The cache beyond one box, offline: a bare git repository stands for the git server and the
default DVC remote (.dvc/config: a folder beside the repository) for the storage. One clone
computes and pushes; another pulls and reruns only what it has never seen."""

import csv
import io
import json

import pytest
from test_pipeline_dvc import STAGES, ran

from conftest import run, set_params

pytestmark = pytest.mark.slow
STATIC = "static_int8"  # the experiment: quantize with calibrated activation ranges


def restored(output: str) -> set[str]:
    """Stages DVC took from the run-cache instead of running them."""
    return {
        stage
        for stage in STAGES
        if f"Stage '{stage}' is cached - skipping run, checking out outputs" in output
    }


def experiments(repo) -> dict[str, dict]:
    rows = csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo).stdout))
    return {row["Experiment"]: row for row in rows if row["Experiment"]}


def test_a_second_clone_pulls_what_the_first_computed(reproduced_project, tmp_path):
    # The first clone has run the micro pipeline and committed it (conftest.micro_repro).
    first, server, second = reproduced_project, tmp_path / "server.git", tmp_path / "second"
    run(["git", "init", "-q", "--bare", "-b", "main", str(server)], tmp_path)
    run(["git", "remote", "add", "origin", str(server)], first)
    run(["git", "push", "-q", "origin", "main"], first)
    run(["python", "-m", "llmpipe.share"], first)  # make push
    assert (tmp_path / "llmpipe-dvc-storage").is_dir()  # the default remote, beside the repo

    # An experiment on the first clone, shared through git and the DVC remote (on quantize:
    # three stages to run, where one on a training stage reruns five; tests/test_pipeline_dvc.py
    # runs one on lora).
    exp = run(["dvc", "exp", "run", "-n", "static", "-S", f"quantize.method={STATIC}"], first)
    assert ran(exp.stdout) == {"quantize", "evaluate", "report"}
    run(["dvc", "exp", "push", "origin", "static"], first)
    run(["python", "-m", "llmpipe.share"], first)
    # The pull-request comment: the one param, the metrics it changed, nothing else.
    markdown = run(["python", "-m", "llmpipe.compare", "HEAD"], first).stdout
    params = markdown.split("### Params")[1].split("### Metrics")[0]
    assert "quantize.method" in params and params.count("| params.yaml") == 1
    metrics = markdown.split("### Metrics")[1]
    assert {f"metrics/{s}.json" for s in STAGES if f"metrics/{s}.json" in metrics} == {
        "metrics/quantize.json",
        "metrics/evaluate.json",
    }

    # The second clone pulls and has nothing to compute.
    run(["git", "clone", "-q", str(server), str(second)], tmp_path)
    run(["git", "config", "user.email", "test@llmpipe.local"], second)
    run(["git", "config", "user.name", "llmpipe test"], second)
    run(["dvc", "pull", "--run-cache"], second)  # make pull
    # A checkout links outputs to the cache, no copies (hard links on this filesystem).
    assert (second / "data/finetune/model/model.safetensors").stat().st_nlink > 1
    repro = run(["dvc", "repro"], second).stdout
    assert not ran(repro) and not restored(repro), repro
    # A value seen on the first clone comes from the run-cache, not from a rerun...
    set_params(second, {"quantize.method": STATIC})
    repro = run(["dvc", "repro", "--pull"], second).stdout
    assert not ran(repro) and restored(repro) == {"quantize", "evaluate", "report"}, repro
    assert json.loads((second / "metrics/quantize.json").read_text()) == json.loads(
        (first / "metrics/quantize.json").read_text()
    )
    # (A value never seen reruns the stage and what depends on it: tests/test_pipeline_dvc.py.)
    run(["git", "checkout", "--", "params.yaml"], second)

    # The first clone's experiment, with its metrics, in the second.
    run(["dvc", "exp", "pull", "origin", "static"], second)
    shown = experiments(second)
    assert shown["static"]["quantize.method"] == STATIC
    assert (
        shown["static"]["int8_val_perplexity"]
        == json.loads((first / "metrics/quantize.json").read_text())[
            "int8_val_perplexity"
        ].__str__()
    )
