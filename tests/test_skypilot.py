"""The SkyPilot task for a preset: what it asks for and runs, and (slow) that SkyPilot's own task
loader accepts it, offline and without a cloud. SkyPilot pins packages llmpipe's server needs
newer (uvicorn < 0.36), so it lives in a virtualenv of its own, as users install it (uv tool,
pipx): the test builds one with uv."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT, run
from llmpipe.launch import skypilot
from llmpipe.launch.executors import read_executor
from llmpipe.launch.skypilot import SkyPilotError, preset_machine, task
from llmpipe.params import read_params_file
from llmpipe.pipeline import validate_mapping
from llmpipe.preset import compose, load_preset

SKYPILOT = "skypilot==0.14.1"  # checked offline here (docs/several-boxes.md)
REMOTE = "s3://example-bucket/llmpipe"


def test_the_task_asks_for_the_presets_machine_and_runs_the_pipeline_there():
    spec = task("gpu", REMOTE)
    assert spec["resources"] == {"accelerators": "H100:8", "disk_size": 512}
    assert spec["num_nodes"] == 1 and spec["envs"] == {"LLMPIPE_EXECUTOR": "torchrun"}
    assert "make setup" in spec["setup"]  # the README's install
    steps = spec["run"].splitlines()
    assert steps.index("python -m llmpipe.preset gpu --write") < steps.index("dvc repro")
    assert steps[-3:] == ["dvc pull --run-cache --allow-missing || true", "dvc repro",
                          "dvc push --run-cache"]  # fmt: skip
    assert f"dvc remote add --local -d -f shared {REMOTE}" in steps


def test_the_machine_is_no_param_and_matches_grpos_process_count():
    assert "machine" not in load_preset("gpu")
    params = validate_mapping(compose(read_params_file(ROOT / "params.yaml"), load_preset("gpu")))
    gpus = int(preset_machine("gpu")["accelerators"].split(":")[1])
    assert params["grpo"].processes == gpus


def test_a_remote_the_box_cannot_reach_and_a_preset_without_machine_are_errors(monkeypatch):
    monkeypatch.chdir(ROOT)  # its .dvc/config: the default remote is a folder beside it
    with pytest.raises(SkyPilotError, match="remote is ../../llmpipe-dvc-storage, a folder"):
        task("gpu", None)
    with pytest.raises(SkyPilotError, match="gpu-smoke.yaml: no machine section"):
        task("gpu-smoke", REMOTE)
    with pytest.raises(SkyPilotError, match="preset 'tpu': not found"):
        task("tpu", REMOTE)


STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "$CALLS"
"""


@pytest.mark.parametrize("box", [0, 1])
def test_on_several_boxes_each_runs_the_pipeline_and_meets_the_first_box(
    tmp_path, monkeypatch, box
):
    """The task's run script, run as SkyPilot runs it on box 0 and box 1 of two (dvc and python
    stubbed): every box writes the executor that meets at the first box's address, with its own
    copy of the outputs, and runs `dvc repro`; only the first box pushes."""
    (tmp_path / "big.yaml").write_text("machine: {accelerators: 'H100:8', nodes: 2}\n")
    monkeypatch.setattr(skypilot, "PRESETS_DIR", tmp_path)
    spec = task("big", REMOTE)
    assert spec["num_nodes"] == 2
    repo = tmp_path / "repo"
    (repo / ".venv/bin").mkdir(parents=True)
    for tool in ("dvc", "python"):
        (repo / ".venv/bin" / tool).write_text(STUB)
        (repo / ".venv/bin" / tool).chmod(0o755)
    (repo / ".venv/bin/activate").write_text(f'PATH="{repo}/.venv/bin:$PATH"\n')
    calls = tmp_path / f"calls-{box}"
    subprocess.run(
        ["bash", "-c", spec["run"]],
        cwd=repo,
        check=True,
        env={
            "PATH": os.environ["PATH"],
            "CALLS": str(calls),
            "SKYPILOT_NODE_RANK": str(box),
            "SKYPILOT_NUM_NODES": "2",
            "SKYPILOT_NODE_IPS": "10.1.2.3\n10.1.2.4\n",
        },
    )
    executor = read_executor(repo, environ={})
    assert (executor.kind, executor.nodes, executor.rdzv_endpoint, executor.shared_filesystem) == (
        "torchrun",
        2,
        "10.1.2.3:29500",
        False,
    )
    ran = calls.read_text().splitlines()
    assert "dvc repro" in ran
    assert ("dvc push --run-cache" in ran) == (box == 0)


@pytest.fixture(scope="module")
def sky_python(tmp_path_factory) -> Path:
    """A virtualenv with SkyPilot, apart from the project's."""
    venv = tmp_path_factory.mktemp("skypilot") / "venv"
    uv = Path(sys.executable).with_name("uv")
    try:
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, venv], check=True)
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", venv / "bin/python", SKYPILOT],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.CalledProcessError as e:
        why = f"cannot install {SKYPILOT}: {(e.stderr or '').strip()[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return venv / "bin/python"


LOAD = """
import json, sys
import sky
from sky import exceptions
task = sky.Task.from_yaml(sys.argv[1])
(resources,) = task.resources
print(json.dumps({"nodes": task.num_nodes, "accelerators": resources.accelerators,
                  "disk": resources.disk_size, "envs": task.envs, "run": task.run}))
try:
    sky.Task.from_yaml(sys.argv[2])
except exceptions.InvalidSkyPilotConfigError as e:
    print(json.dumps({"refused": str(e)}))
"""


@pytest.mark.slow
def test_skypilots_own_loader_accepts_the_task(sky_python, tmp_path):
    out = tmp_path / "sky-gpu.yaml"
    run([sys.executable, "-m", "llmpipe.launch.skypilot", "gpu", "-o", out, "--remote", REMOTE],
        ROOT)  # fmt: skip
    typo = YAML(typ="safe").load(out.read_text())
    typo["resources"]["accelerator"] = typo["resources"].pop("accelerators")
    bad = tmp_path / "typo.yaml"
    YAML(typ="safe").dump(typo, bad)
    # Offline and without credentials: SkyPilot keeps its state under HOME.
    result = subprocess.run(
        [sky_python, "-c", LOAD, out, bad],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    loaded, refused = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert loaded["nodes"] == 1 and loaded["accelerators"] == {"H100": 8}
    assert loaded["disk"] == 512 and loaded["envs"] == {"LLMPIPE_EXECUTOR": "torchrun"}
    assert loaded["run"].rstrip().endswith("dvc push --run-cache")
    assert "did you mean 'accelerators'" in refused["refused"]
