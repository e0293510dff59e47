"""The GPU smoke run's runner (llmpipe.smoke): no DVC, the project on PYTHONPATH, missing
dependencies from a folder of wheels. Rehearsed here on CPU with the same command line, the
GPU-only settings of the preset (cuda, bf16, compile, GPT-2 124M) overridden by --set."""

import json
import subprocess
import sys

import pytest
from ruamel.yaml import YAML

from conftest import MICRO_PARAMS, ROOT, run
from llmpipe import layout, smoke
from llmpipe.errors import ParamsError
from llmpipe.params import STAGE_SCHEMAS
from llmpipe.preset import compose, load_preset


def test_the_stages_run_in_dvc_yamls_order():
    dvc = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())
    assert smoke.STAGES == tuple(dvc["stages"]) == tuple(layout.STAGES)


def test_stage_commands_take_the_launchers_from_params():
    params = compose(YAML(typ="safe").load((ROOT / "params.yaml").read_text()),
                     {"grpo": {"launcher": "torchrun --standalone --nproc_per_node 8"}})
    assert smoke.stage_command("grpo", params) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8",
        "-m", "stages.grpo"]
    assert smoke.stage_command("evaluate", params) == [sys.executable, "-m", "stages.evaluate"]


def test_missing_dependencies_come_from_the_wheels_folder(tmp_path, monkeypatch):
    assert "trl" in smoke.requirements() and "torch" not in smoke.requirements()
    assert smoke.missing_distributions(["transformers", "no-such-distribution"]) == [
        "no-such-distribution"]
    with pytest.raises(smoke.SmokeError, match=r"--wheels .*/nowhere: no such directory"):
        smoke.install_from_wheels(["trl"], tmp_path / "nowhere")
    commands = []
    monkeypatch.setattr(smoke.subprocess, "run", lambda command: commands.append(command)
                        or subprocess.CompletedProcess(command, 0))
    smoke.install_from_wheels(["trl", "dvclive"], tmp_path)
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                         str(tmp_path), "trl", "dvclive"]]


def test_the_gpu_smoke_preset_is_a_gpt2_124m_run_from_local_data():
    preset = load_preset("gpu-smoke")
    assert "download" not in preset  # the embedded corpora: no hub, no network
    model = preset["pretrain"]["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"]) == (
        12, 12, 768, 1024)
    p = preset["pretrain"]
    assert (p["device"], p["dtype"], p["compile"]) == ("cuda", "bfloat16", True)


def test_bad_overrides_are_one_line_errors(tmp_path):
    with pytest.raises(smoke.SmokeError, match=r"--set 'pretrain.max_steps': expected key=value"):
        smoke.compose_params("gpu-smoke", ["pretrain.max_steps"], tmp_path)
    with pytest.raises(ParamsError, match=r"^pretrain\.max_steps: -1 is not a positive integer"):
        smoke.compose_params("gpu-smoke", ["pretrain.max_steps=-1"], tmp_path)


# The preset's GPU settings, scaled to the micro configuration for a 2-core CPU.
CPU_REHEARSAL = {**MICRO_PARAMS, "pretrain.device": "cpu", "pretrain.dtype": "float32",
                 "pretrain.compile": False, "pretrain.model.vocab_multiple": 1,
                 "pretrain.grad_accum_steps": 1, "pretrain.sample.prompts": ["Return the"],
                 "quantize.compile": False, "preferences.train_prompts": 32,
                 "preferences.heldout_prompts": 8, "grpo.prompts_per_step": 2}


@pytest.mark.slow
def test_the_smoke_run_rehearsed_on_cpu_runs_every_stage_without_dvc(tmp_path):
    overrides = [arg for key, value in CPU_REHEARSAL.items()
                 for arg in ("--set", f"{key}={json.dumps(value)}")]
    run_dir = tmp_path / "run"
    # The project on PYTHONPATH only, as on a GPU box without `pip install -e .`.
    result = run([sys.executable, "-m", "llmpipe.smoke", "gpu-smoke", "--run-dir", str(run_dir),
                  *overrides], tmp_path, PYTHONPATH=str(ROOT / "src"))
    summary = json.loads((run_dir / "smoke.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == list(smoke.STAGES)
    assert all(row["wall_s"] > 0 for row in summary["stages"])
    assert summary["pretrain"]["tokens_per_s"] > 0 and summary["pretrain"]["mfu"] > 0
    assert "| pretrain |" in result.stdout and "tokens/s, MFU" in result.stdout
    for stage in STAGE_SCHEMAS:
        assert (run_dir / layout.metrics_file(stage)).exists(), stage
    assert (run_dir / layout.REPORT / "report.md").exists()
    assert not (tmp_path / ".dvc").exists() and not (run_dir / "dvc.lock").exists()
