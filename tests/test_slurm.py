"""The slurm executor against a real Slurm: a one-node cluster (Debian's slurm-wlm and munge;
.ci/run installs them) started by the fixture with a generated slurm.conf. A stage run through
Slurm writes what the local executor writes; a failing stage's exit status reaches `dvc repro`;
a cancelled job fails the stage with a line that says so; and the several-node path (srun, one
torchrun agent per task, static rendezvous at the first host) runs with 2 tasks on the one node.

Where the packages are not installed the tests skip, saying so, except under CI=true, where
they fail: CI must run them."""

import getpass
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MICRO_PARAMS, git_commit_all, run, set_params, subprocess_env

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbin(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )


def slurm_conf(directory: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    for sub in ("state", "spool"):
        (directory / sub).mkdir()
    conf = directory / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=llmpipe-test",
                f"SlurmctldHost={host}",
                f"SlurmUser={getpass.getuser()}",
                "AuthType=auth/munge",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                # A cancelled job's processes get 2 s between SIGTERM and SIGKILL (30 by
                # default), so the next test's job does not wait for its cores.
                "KillWait=2",
                "MpiDefault=none",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                f"StateSaveLocation={directory / 'state'}",
                f"SlurmdSpoolDir={directory / 'spool'}",
                f"SlurmctldPidFile={directory / 'slurmctld.pid'}",
                f"SlurmdPidFile={directory / 'slurmd.pid'}",
                f"SlurmctldLogFile={directory / 'slurmctld.log'}",
                f"SlurmdLogFile={directory / 'slurmd.log'}",
                f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def command_output(command: list[str], env: dict) -> str:
    return subprocess.run(command, env=env, capture_output=True, text=True).stdout.strip()


def cannot(why: str) -> None:
    """Skip, saying why; under CI=true fail instead: CI must run these tests."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI must run the Slurm tests (.ci/run installs Slurm)")
    pytest.skip(why)


def start_munge() -> None:
    """munged as the munge user, unless one runs (a machine's own, or an earlier session's)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", sbin("munged")], check=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A running one-node Slurm; the environment that points its commands at it."""
    missing = [d for d in DAEMONS if sbin(d) is None] + [
        c for c in ("sbatch", "scancel", "squeue") if shutil.which(c) is None
    ]
    if missing:
        cannot(f"Slurm is not installed (no {', '.join(missing)}: apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        cannot("the test cluster's slurmd runs as root, and this is not root")
    directory = tmp_path_factory.mktemp("slurm")
    conf = slurm_conf(directory)
    env = {"SLURM_CONF": str(conf)}
    start_munge()
    subprocess.run([sbin("slurmctld"), "-f", str(conf)], check=True)
    subprocess.run([sbin("slurmd"), "-f", str(conf)], check=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            state = command_output(["sinfo", "-h", "-o", "%T"], {**os.environ, **env})
            if state == "idle":
                break
            if time.monotonic() > deadline:
                logs = "\n".join(
                    (directory / f"{d}.log").read_text()[-2000:]
                    for d in ("slurmctld", "slurmd")
                    if (directory / f"{d}.log").exists()
                )
                pytest.fail(f"the test cluster's node is {state!r}, not idle:\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        for daemon in ("slurmd", "slurmctld"):
            pid_file = directory / f"{daemon}.pid"
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def executor(repo: Path, text: str) -> None:
    (repo / ".llmpipe").mkdir(exist_ok=True)
    (repo / ".llmpipe/executor.yaml").write_text(text)


def digest(repo: Path, paths: list[str]) -> dict[str, str]:
    files = sorted(
        p
        for path in paths
        for p in ([repo / path] if (repo / path).is_file() else (repo / path).rglob("*"))
        if p.is_file()
    )
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


TOKENIZE_OUTPUTS = ["data/tokenizer", "data/tokens"]


def test_a_stage_through_slurm_writes_what_it_writes_locally(slurm, project_copy):
    repo = project_copy
    set_params(repo, MICRO_PARAMS)
    run(["dvc", "repro", "tokenize"], repo)  # the local executor
    git_commit_all(repo, "tokenized")
    local = digest(repo, TOKENIZE_OUTPUTS)

    executor(repo, "kind: slurm\n")
    assert json.loads(run(["dvc", "status", "--json", "tokenize"], repo, **slurm).stdout) == {}
    out = run(["dvc", "repro", "--force", "--single-item", "tokenize"], repo, **slurm).stdout
    assert "tokenize: sbatch --parsable --job-name llmpipe-tokenize" in out
    assert "Slurm job" in out and "MB/s -> data/tokens" in out  # the job's log, streamed
    assert digest(repo, TOKENIZE_OUTPUTS) == local
    assert json.loads(run(["dvc", "status", "--json", "tokenize"], repo, **slurm).stdout) == {}


def test_a_failing_job_fails_dvc_repro_with_the_stages_error(slurm, project_copy):
    repo = project_copy
    set_params(repo, {**MICRO_PARAMS, "download.finetune.source": "file:/nonexistent.txt"})
    executor(repo, "kind: slurm\n")
    result = run(["dvc", "repro", "download"], repo, check=False, **slurm)
    assert result.returncode != 0
    assert "error: file:/nonexistent.txt: file not found" in result.stdout  # from the job's log
    assert "Slurm job" in result.stderr and "ended FAILED (exit code 2:0)" in result.stderr


def test_the_several_node_path_runs_two_torchrun_agents_under_srun(
    slurm, micro_workspace, tmp_path
):
    workspace = tmp_path / "ws"
    shutil.copytree(micro_workspace, workspace)
    set_params(workspace, {"pretrain.grad_accum_steps": 2, "pretrain.max_steps": 6})
    executor(workspace, "kind: slurm\nprocesses: 1\nslurm: {tasks: 2}\n")
    out = run([sys.executable, "-m", "llmpipe.launch", "pretrain"], workspace, **slurm).stdout
    assert "--ntasks 2" in out
    metrics = json.loads((workspace / "metrics/pretrain.json").read_text())
    assert metrics["perf"]["processes"] == 2 and metrics["steps"] == 6


# Last: a cancelled job's processes may hold the node's cores a while after it ends, and a
# job after it would wait for them (42 s of CI's 15 minutes, once).
def test_a_cancelled_job_fails_the_stage_cleanly(slurm, micro_workspace, tmp_path):
    workspace = tmp_path / "ws"
    shutil.copytree(micro_workspace, workspace)
    set_params(workspace, {"pretrain.max_steps": 100000, "pretrain.eval_interval": 100000})
    executor(workspace, "kind: slurm\nprocesses: 1\n")  # a CPU cluster: one process a node
    env = subprocess_env(**slurm)
    stage = subprocess.Popen(
        [sys.executable, "-m", "llmpipe.launch", "pretrain"],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        squeue = ["squeue", "-h", "-n", "llmpipe-pretrain", "-o", "%T"]
        while "RUNNING" not in command_output(squeue, env):
            assert stage.poll() is None, stage.communicate()
            assert time.monotonic() < deadline, (command_output(["squeue"], env), "never started")
            time.sleep(0.5)
        subprocess.run(["scancel", "-n", "llmpipe-pretrain"], env=env, check=True)
        out, err = stage.communicate(timeout=60)
    finally:
        stage.kill()
    assert stage.returncode != 0
    assert "ended CANCELLED" in err, (out, err)
