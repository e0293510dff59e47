"""Where a stage runs is the machine's setting, not a param: the executor setting, the command
each executor builds, and (end to end, on a reproduced micro project) that switching executor
reruns nothing and gives the same figures.

Tolerance: finetune on 2 processes against 1 agrees to 1e-4 relative (the same data in the same
order; the all-reduce sums in another order), as tests/test_launchers.py states for every
stage that trains on several processes."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run, subprocess_env
from llmpipe.launch import executors, slurm
from llmpipe.launch.executors import (
    ExecutorError,
    node_command,
    node_environment,
    read_executor,
)
from llmpipe.stage import INPUTS_DIGEST, OUTPUTS_ON_EACH_NODE

PY = sys.executable


def settings(tmp_path, text: str):
    (tmp_path / ".llmpipe").mkdir(exist_ok=True)
    (tmp_path / ".llmpipe/executor.yaml").write_text(text)
    return tmp_path


def test_without_a_setting_every_stage_is_one_local_process(tmp_path):
    executor = read_executor(tmp_path, environ={})
    assert executor.kind == "local"
    assert node_command("pretrain", executor) == [PY, "-m", "stages.pretrain"]


def test_the_setting_is_found_from_a_temporary_workspace_below_the_repository(tmp_path):
    """DVC runs queued and --temp experiments in .dvc/tmp/exps/<dir> of the repository."""
    settings(tmp_path, "kind: torchrun\nprocesses: 2\n")
    workspace = tmp_path / ".dvc/tmp/exps/tmpabc"
    workspace.mkdir(parents=True)
    executor = read_executor(workspace, environ={})
    assert executor.kind == "torchrun" and executor.processes == 2
    assert executor.source == str(tmp_path.resolve() / ".llmpipe/executor.yaml")


def test_the_environment_overrides_the_file(tmp_path):
    settings(tmp_path, "kind: torchrun\nprocesses: 2\n")
    executor = read_executor(tmp_path, environ={"LLMPIPE_EXECUTOR": "local"})
    assert executor.kind == "local" and executor.source.startswith("LLMPIPE_EXECUTOR=local")
    other = tmp_path / "elsewhere.yaml"
    other.write_text("kind: accelerate\nprocesses: 4\n")
    named = read_executor(tmp_path, environ={"LLMPIPE_EXECUTOR_FILE": str(other)})
    assert named.kind == "accelerate" and named.processes == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: deepspeed\n", "kind: 'deepspeed' is not an executor: local, torchrun"),
        ("kind: torchrun\nprocesses: 0\n", "processes: 0 is not a positive integer"),
        ("nodes: 2\n", "rdzv_endpoint: None is not set: 2 nodes need node 0's host:port"),
        ("procs: 2\n", "unknown setting 'procs'"),
        ("stages: {evaluat: local}\n", "stages.evaluat: 'evaluat' is not a stage"),
        ("stages: {evaluate: cloud}\n", "stages.evaluate: 'cloud' is not an executor"),
        ("slurm: {nodes: two}\n", "slurm.nodes: 'two' is not a positive integer"),
        ("slurm: {partitions: gpu}\n", "unknown setting slurm.partitions"),
        ("slurm: {options: --qos=high}\n", "slurm.options: '--qos=high' is not a list"),
        ("kind: [torchrun\n", "not valid YAML"),
    ],
)
def test_a_bad_setting_names_the_file_and_the_field(tmp_path, text, message):
    settings(tmp_path, text)
    with pytest.raises(ExecutorError) as err:
        read_executor(tmp_path, environ={})
    assert str(err.value).startswith(f"{tmp_path.resolve()}/.llmpipe/executor.yaml: ")
    assert message in str(err.value)


def test_torchrun_spreads_the_training_stages_only(tmp_path):
    executor = read_executor(settings(tmp_path, "kind: torchrun\nprocesses: 2\n"), environ={})
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for stage in executors.SPREAD_STAGES:
        assert node_command(stage, executor) == [*torchrun, "-m", f"stages.{stage}"]
    for stage in ("download", "task_sft", "reinforce", "evaluate", "report"):
        assert node_command(stage, executor) == [PY, "-m", f"stages.{stage}"]


def test_several_boxes_meet_at_node_0(tmp_path):
    executor = read_executor(
        settings(tmp_path, "kind: torchrun\nprocesses: 8\nnodes: 2\nrdzv_endpoint: 10.0.0.1:29500"),
        environ={},
    )
    assert node_command("pretrain", executor)[3:] == [
        "--nnodes",
        "2",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "10.0.0.1:29500",
        "--rdzv_id",
        "llmpipe-pretrain",
        "--rdzv_conf",
        "join_timeout=1800",
        "--nproc_per_node",
        "8",
        "-m",
        "stages.pretrain",
    ]
    assert node_environment("pretrain", executor) == {}  # a shared file system: rank 0 writes


def test_boxes_with_their_own_copies_each_write_after_comparing_inputs(tmp_path):
    """shared_filesystem: false (SkyPilot's boxes): the spread stages' processes learn that
    each box writes, and get this box's digest of the stage's deps and params.yaml."""
    executor = read_executor(
        settings(
            tmp_path,
            "kind: torchrun\nnodes: 2\nrdzv_endpoint: 10.0.0.1:29500\nshared_filesystem: false\n",
        ),
        environ={},
    )
    (tmp_path / "data/tokens").mkdir(parents=True)
    (tmp_path / "data/tokens/train.bin").write_bytes(b"tokens")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  pretrain:\n    cmd: x\n    deps: [data/tokens, stages/pretrain.py]\n"
    )
    environment = node_environment("pretrain", executor, tmp_path / "dvc.yaml")
    assert environment[OUTPUTS_ON_EACH_NODE] == "1"
    digest = json.loads(environment[INPUTS_DIGEST])
    assert sorted(digest) == ["data/tokens", "params.yaml", "stages/pretrain.py"]
    (tmp_path / "data/tokens/train.bin").write_bytes(b"tokenz")
    changed = json.loads(
        node_environment("pretrain", executor, tmp_path / "dvc.yaml")[INPUTS_DIGEST]
    )
    assert changed["data/tokens"] != digest["data/tokens"]
    assert changed["params.yaml"] == digest["params.yaml"]
    assert node_environment("evaluate", executor, tmp_path / "dvc.yaml") == {}  # one box each


def test_a_box_whose_inputs_differ_is_named(tmp_path):
    """What every process of a run across boxes checks before it trains, through a store as
    torchrun's: rank 0's inputs are the reference, a differing box is named with the path."""
    import datetime
    import threading

    from torch.distributed import PrefixStore, TCPStore

    from llmpipe.stage import compare_inputs

    timeout = datetime.timedelta(seconds=30)
    server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timeout)
    same = {"data/tokens": "aa", "params.yaml": "bb"}

    def boxes(inputs: dict[int, dict], attempt: str) -> dict[int, str]:
        """Each box a thread with its own connection to the store, as each process has."""
        outcome = {}

        def box(rank: int) -> None:
            client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
            try:
                compare_inputs(PrefixStore(attempt, client), rank, 2, f"{rank} (host{rank})",
                               inputs[rank])  # fmt: skip
                outcome[rank] = "ok"
            except Exception as e:  # noqa: BLE001 - the test reads every outcome
                outcome[rank] = f"{type(e).__name__}: {e}"

        threads = [threading.Thread(target=box, args=(rank,)) for rank in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return outcome

    differ = boxes({0: same, 1: {**same, "data/tokens": "cc"}}, "first")
    assert differ[0] == differ[1]  # every process stops, with one message
    assert differ[0].startswith(
        "DataError: data/tokens: not the same on box 1 (host1) as on box 0 (host0) (md5 cc vs aa)"
    )
    assert boxes({0: same, 1: same}, "second") == {0: "ok", 1: "ok"}


@pytest.mark.parametrize("kind", ["accelerate", "slurm"])
def test_only_torchrun_runs_across_boxes_with_their_own_copies(tmp_path, kind):
    settings(tmp_path, f"kind: {kind}\nshared_filesystem: false\n")
    with pytest.raises(
        ExecutorError, match=f"shared_filesystem: False is not possible with the {kind}"
    ):
        read_executor(tmp_path, environ={})


def test_gpu_means_every_visible_gpu_and_fails_clearly_without_one(tmp_path):
    executor = read_executor(settings(tmp_path, "kind: torchrun\n"), environ={})
    assert node_command("lora", executor, gpus=4)[5] == "4"
    with pytest.raises(ExecutorError, match="processes: 'gpu', but no GPU is visible here"):
        node_command("lora", executor, gpus=0)


def test_grpos_process_count_comes_from_params_under_every_executor(tmp_path, monkeypatch):
    """GRPO's completions depend on the count, so params.yaml says it, not the executor."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("grpo:\n  processes: 2\ntask_grpo:\n  processes: 1\n")
    for kind in ("local", "torchrun"):
        executor = read_executor(settings(tmp_path, f"kind: {kind}\nprocesses: 4\n"), environ={})
        assert node_command("grpo", executor)[4:] == ["--nproc_per_node", "2", "-m", "stages.grpo"]
        assert node_command("task_grpo", executor) == [PY, "-m", "stages.task_grpo"]


def test_accelerate_takes_its_config_and_a_stage_can_stay_local(tmp_path):
    executor = read_executor(
        settings(
            tmp_path,
            "kind: accelerate\nprocesses: 2\naccelerate_config: configs/accelerate/fsdp.yaml\n"
            "stages: {finetune: local}\n",
        ),
        environ={},
    )
    assert node_command("reward_model", executor) == [
        PY,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/fsdp.yaml",
        "--num_processes",
        "2",
        "-m",
        "stages.reward_model",
    ]
    assert node_command("finetune", executor) == [PY, "-m", "stages.finetune"]


def test_the_entry_point_prints_its_command_and_a_bad_setting_in_one_line(tmp_path):
    settings(tmp_path, "kind: torchrun\nprocesses: 2\n")
    entry = [PY, "-m", "llmpipe.launch"]
    dry = run([*entry, "finetune", "--dry-run"], tmp_path)
    assert dry.stdout.startswith(
        "finetune: python -m torch.distributed.run --standalone --nproc_per_node 2 -m "
        "stages.finetune (executor: "
    )
    settings(tmp_path, "kind: torchrun\nprocesses: -1\n")
    bad = subprocess.run(
        [*entry, "finetune"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path.resolve()}/.llmpipe/executor.yaml: processes: -1 is not a positive "
        "integer"
    ]


def test_a_slurm_job_runs_the_node_command_or_srun_over_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = read_executor(
        settings(tmp_path, "kind: slurm\nslurm: {gpus_per_node: 4, partition: gpu}\n"), environ={}
    )
    script = slurm.batch_script("pretrain", one)
    assert script.splitlines()[-1] == (
        f"exec {PY} -m torch.distributed.run --standalone --nproc_per_node 4 -m stages.pretrain"
    )
    assert slurm.batch_script("evaluate", one).splitlines()[-1] == f"exec {PY} -m stages.evaluate"
    command = slurm.sbatch_command("pretrain", one, tmp_path / "s.sh", tmp_path / "s.log")
    assert command[:2] == ["sbatch", "--parsable"]
    assert ["--partition", "gpu"] == command[command.index("--partition") :][:2]
    assert ["--gpus-per-node", "4"] == command[command.index("--gpus-per-node") :][:2]

    several = read_executor(
        settings(tmp_path, "kind: slurm\nprocesses: 8\nslurm: {nodes: 4, time: '04:00:00'}\n"),
        environ={},
    )
    script = slurm.batch_script("finetune", several)
    assert "MASTER_ADDR=$(scontrol show hostnames" in script
    last = script.splitlines()[-1]
    assert last.startswith("exec srun --ntasks 4 --kill-on-bad-exit=1 bash -c ")
    assert (
        '--nnodes 4 --nproc_per_node 8 --master_port 29500 --node_rank "$SLURM_PROCID" '
        '--master_addr "$MASTER_ADDR" -m stages.finetune'
    ) in last
    command = slurm.sbatch_command("finetune", several, tmp_path / "s.sh", tmp_path / "s.log")
    assert command[command.index("--nodes") + 1] == "4"
    assert command[command.index("--ntasks-per-node") + 1] == "1"
    # A stage that runs in one process asks for one node whatever the setting.
    command = slurm.sbatch_command("report", several, tmp_path / "s.sh", tmp_path / "s.log")
    assert command[command.index("--nodes") + 1] == "1"


def test_slurm_with_processes_gpu_needs_the_gpus_per_node(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    executor = read_executor(settings(tmp_path, "kind: slurm\n"), environ={})
    with pytest.raises(ExecutorError, match="needs slurm.gpus_per_node"):
        slurm.batch_script("pretrain", executor)


@pytest.mark.slow
def test_switching_executor_reruns_nothing_and_keeps_the_figures(reproduced_project):
    """The micro project ran every stage in one process; under torchrun with 2 processes DVC
    sees nothing changed, and a forced finetune ends on the same figures within 1e-4."""
    repo = reproduced_project
    one = json.loads((repo / "metrics/finetune.json").read_text())
    settings(repo, "kind: torchrun\nprocesses: 2\n")
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout

    out = run(["dvc", "repro", "--force", "--single-item", "finetune"], repo).stdout
    assert "python -m torch.distributed.run --standalone --nproc_per_node 2" in out
    two = json.loads((repo / "metrics/finetune.json").read_text())
    assert (one["perf"]["processes"], two["perf"]["processes"]) == (1, 2)
    assert one["steps"] == two["steps"] and one["base_val_perplexity"] == two["base_val_perplexity"]
    for key in ("val_perplexity", "train_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


def test_no_tracked_file_names_a_launcher():
    """Presets, workflows and scripts set the executor, not a launcher param."""
    tracked = subprocess.run(
        ["git", "ls-files", "src", "scripts", ".github", "params.yaml", "dvc.yaml", "Makefile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    offenders = [
        name
        for name in tracked
        if (ROOT / name).is_file() and ".launcher" in (ROOT / name).read_text(errors="ignore")
    ]
    assert offenders == []
