"""The GPU smoke run's runner (llmpipe.smoke): no DVC, the project on PYTHONPATH, missing
dependencies from a folder of wheels; and the GPU check around it (scripts/gpu_check.sh),
rehearsed here on the CPU with --dry-run (the preset at micro shapes: smoke.CPU_REHEARSAL)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from ruamel.yaml import YAML

from conftest import ROOT, run
from llmpipe import layout, smoke
from llmpipe.errors import ParamsError
from llmpipe.pipeline import STAGE_SCHEMAS
from llmpipe.preset import load_preset


def test_the_stages_run_in_dvc_yamls_order():
    dvc = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())
    assert smoke.STAGES == tuple(dvc["stages"]) == tuple(layout.STAGES)


def test_every_stage_runs_as_dvc_yaml_runs_it():
    """Through the launch entry point, under this machine's executor (tests/test_executors.py)."""
    dvc = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())
    for stage, spec in dvc["stages"].items():
        assert smoke.stage_command(stage) == [sys.executable, *spec["cmd"].split()[1:]]


def test_missing_dependencies_come_from_the_wheels_folder(tmp_path, monkeypatch):
    assert "trl" in smoke.requirements() and "torch" not in smoke.requirements()
    assert smoke.missing_distributions(["transformers", "no-such-distribution"]) == [
        "no-such-distribution"
    ]
    with pytest.raises(smoke.SmokeError, match=r"--wheels .*/nowhere: no such directory"):
        smoke.install_from_wheels(tmp_path / "nowhere", tmp_path / "kit")
    for name in ("trl-1.16.0-py3-none-any.whl", "dvclive-3.49.1-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    commands = []
    monkeypatch.setattr(
        smoke.subprocess,
        "run",
        lambda command: commands.append(command) or subprocess.CompletedProcess(command, 0),
    )
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    monkeypatch.setattr(sys, "path", list(sys.path))
    smoke.install_from_wheels(tmp_path, tmp_path / "kit")
    # The whole kit, --no-deps, into a folder of its own that the stages see first.
    assert commands == [
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--quiet",
            "--target",
            str(tmp_path / "kit"),
            str(tmp_path / "dvclive-3.49.1-py3-none-any.whl"),
            str(tmp_path / "trl-1.16.0-py3-none-any.whl"),
        ]
    ]
    assert os.environ["PYTHONPATH"] == f"{tmp_path / 'kit'}{os.pathsep}elsewhere"
    assert sys.path[0] == str(tmp_path / "kit")


def test_the_gpu_smoke_preset_is_a_gpt2_124m_run_from_local_data():
    preset = load_preset("gpu-smoke")
    assert "download" not in preset  # the embedded corpora: no hub, no network
    model = preset["pretrain"]["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"]) == (
        12,
        12,
        768,
        1024,
    )
    p = preset["pretrain"]
    # Not compiled: bench/gpt2_mfu.py measures the compiled model in the same GPU check.
    assert (p["device"], p["dtype"], p["compile"], p["chunked_loss"]) == (
        "cuda",
        "bfloat16",
        False,
        False,
    )


def test_bad_overrides_are_one_line_errors(tmp_path):
    with pytest.raises(smoke.SmokeError, match=r"--set 'pretrain.max_steps': expected key=value"):
        smoke.compose_params("gpu-smoke", ["pretrain.max_steps"], tmp_path)
    with pytest.raises(ParamsError, match=r"^pretrain\.max_steps: -1 is not a positive integer"):
        smoke.compose_params("gpu-smoke", ["pretrain.max_steps=-1"], tmp_path)


@pytest.mark.slow
def test_the_gpu_check_dry_run_runs_every_part_on_the_cpu(tmp_path):
    """scripts/gpu_check.sh --dry-run: the GPU check's code at micro shapes (the environment,
    GPT-2's MFU bench, the gpu-smoke preset through every stage, without DVC), each part
    recorded in the JSON. The kit part is make gpu-rehearsal's and tests/test_gpu_kit.py's."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = run(
        [
            "bash",
            str(ROOT / "scripts" / "gpu_check.sh"),
            "--dry-run",
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        tmp_path,
        PYTHON=sys.executable,
    )
    check = json.loads((out / "gpu_check.json").read_text())
    parts = check["parts"]
    assert check["dry_run"] and check["failed_parts"] == []
    assert list(parts) == ["environment", "kit", "mfu", "smoke"]
    assert parts["environment"]["torch"] == torch.__version__
    assert "make smoke-wheels" in parts["kit"]["skipped"]  # no wheels folder given
    mfu = parts["mfu"]["figures"]
    assert mfu["tokens_per_s"] > 0 and mfu["mfu"] is None  # no data-sheet peak for a CPU
    assert mfu["time_to_target"]["hours"] == pytest.approx(
        10e9 / (8 * mfu["tokens_per_s"]) / 3600, rel=0.01
    )
    summary = parts["smoke"]["summary"]
    assert summary["finished"] and summary["cpu_rehearsal"]
    assert [row["stage"] for row in summary["stages"]] == list(smoke.STAGES)
    assert all(row["wall_s"] > 0 and row["exit_code"] == 0 for row in summary["stages"])
    assert summary["pretrain"]["tokens_per_s"] > 0
    assert parts["smoke"]["quantize"]["method"] == "weight_only_int8"
    assert "| pretrain |" in (out / "smoke.log").read_text()
    for stage in STAGE_SCHEMAS:
        assert (work / "smoke" / layout.metrics_file(stage)).exists(), stage
    assert (work / "smoke" / layout.REPORT / "report.md").exists()
    assert not (tmp_path / ".dvc").exists() and not (work / "smoke" / "dvc.lock").exists()
    assert "every part passed" in result.stdout


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_a_part_over_its_time_limit_is_killed_and_recorded(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    check = gpu_check.Check(tmp_path, dry_run=True)
    monkeypatch.setitem(check.limits, "mfu", 1)
    record = check.part(
        "mfu",
        check.run(
            "mfu",
            [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"],
            {},
            tmp_path / "mfu.log",
        ),
    )
    assert record["timed_out"] and record["exit_code"] is None and record["wall_s"] < 10
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["mfu"] == record
    assert record["log_tail"] == ["started"]


def test_the_gpu_check_reruns_only_the_parts_asked_for(tmp_path, capsys):
    """A rerun on the GPU machine's last minutes: --parts environment runs that part alone."""
    gpu_check = load_gpu_check()
    code = gpu_check.main(
        [
            "--dry-run",
            "--parts",
            "environment",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
        ]
    )
    check = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert code == 0 and list(check["parts"]) == ["environment"]
    assert check["parts"]["environment"]["python"]
    with pytest.raises(SystemExit):
        gpu_check.main(["--parts", "environment,mfuu"])
    assert "--parts: unknown mfuu" in capsys.readouterr().err
