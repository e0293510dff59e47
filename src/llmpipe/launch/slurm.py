"""The slurm executor: a stage as one Slurm job, waited for, its log streamed.

`sbatch --parsable` submits a batch script (kept beside the job's log in `slurm.log_dir`); the
launch then streams the log and polls the job until its end state, whose exit status is the
stage's, so `dvc repro` stops on a failed job as on a failed local stage. A cancelled job
(`scancel`) or one past its time limit fails the stage with a line that says so; interrupting
`dvc repro` cancels the job.

It polls instead of `sbatch --wait`, whose polls come at 2, 10, 42, 74... s after submission
(slurm 22.05's sbatch doubles its sleep twice over, up to 32 s): a 10.2 s job took 42 s.

On one node the job runs the stage's node command (executors.node_command). On several nodes
(or `slurm.tasks` > 1) `srun` starts one torchrun agent per node, and the agents meet at node 0
(the job's first host, `slurm.master_port`) with their node rank from SLURM_PROCID: torchrun's
static rendezvous, as in Slurm's and PyTorch's multi-node examples. The nodes need the
repository on a shared file system (the usual cluster home or project directory): rank 0
writes the stage's outputs there.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmpipe.launch.executors import (
    COUNTED_STAGES,
    SPREAD_STAGES,
    Executor,
    ExecutorError,
    counted_processes,
    node_command,
    stage_module,
)

POLL_S = 0.2  # how often the log is read while the job runs
# How often Slurm is asked for the job's state: every second at first, then a tenth of the time
# waited so far (an end seen at most 10% late), never more than twice a minute: one RPC to
# slurmctld per stage, as gentle as sbatch --wait's own polls on a long job.
QUERY_S, MAX_QUERY_S = 1.0, 30.0


def agents(executor: Executor, stage: str) -> int:
    """torchrun agents the job starts under srun (1: no srun, the node command alone)."""
    if stage not in SPREAD_STAGES:
        return 1
    return executor.slurm.tasks or executor.slurm.nodes


def processes_per_agent(executor: Executor) -> int:
    if executor.processes != "gpu":
        return int(executor.processes)
    if executor.slurm.gpus_per_node is None:
        raise ExecutorError(
            f"{executor.source}: processes: 'gpu' under slurm needs slurm.gpus_per_node (the "
            "GPUs each node asks for), or set processes to a number"
        )
    return executor.slurm.gpus_per_node


def batch_script(stage: str, executor: Executor) -> str:
    """The job's script: the node command, or srun with one torchrun agent per node."""
    lines = [
        "#!/bin/bash",
        f"# llmpipe stage {stage}: written by python -m llmpipe.launch ({executor.source})",
        "set -euo pipefail",
    ]
    count = agents(executor, stage)
    if count == 1:
        if stage in SPREAD_STAGES:
            executor = _one_node(executor)
        lines.append(f"exec {shlex.join(node_command(stage, executor))}")
        return "\n".join(lines) + "\n"
    port = executor.slurm.master_port
    agent = [
        sys.executable,  # the venv's, on the shared file system
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(count),
        "--nproc_per_node",
        str(processes_per_agent(executor)),
        "--master_port",
        str(port),
    ]
    # Expanded by each task's shell: its rank among the agents, and node 0's address.
    per_task = (
        f'{shlex.join(agent)} --node_rank "$SLURM_PROCID" --master_addr "$MASTER_ADDR" '
        f"{shlex.join(stage_module(stage))}"
    )
    lines += [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        f"exec srun --ntasks {count} --kill-on-bad-exit=1 bash -c "
        + shlex.quote(f"exec {per_task}"),
    ]
    return "\n".join(lines) + "\n"


def _one_node(executor: Executor) -> Executor:
    """The node command of a one-agent job: torchrun standalone over this node's processes."""
    import dataclasses

    nproc = processes_per_agent(executor)
    return dataclasses.replace(executor, kind="torchrun", processes=nproc, nodes=1)


def sbatch_command(stage: str, executor: Executor, script: Path, log: Path) -> list[str]:
    s = executor.slurm
    count = agents(executor, stage)
    command = [
        "sbatch",
        "--parsable",
        "--job-name",
        f"llmpipe-{stage}",
        "--output",
        str(log),
        "--chdir",
        str(Path.cwd()),
        "--nodes",
        str(s.nodes if stage in SPREAD_STAGES else 1),
        "--ntasks",
        str(count),
    ]
    if count == s.nodes and count > 1:
        command += ["--ntasks-per-node", "1"]
    if s.partition:
        command += ["--partition", s.partition]
    gpus = s.gpus_per_node
    if stage in COUNTED_STAGES and gpus is not None:
        gpus = max(gpus, counted_processes(stage))
    if gpus is not None:
        command += ["--gpus-per-node", str(gpus)]
    if s.cpus_per_task is not None:
        command += ["--cpus-per-task", str(s.cpus_per_task)]
    if s.time:
        command += ["--time", s.time]
    return [*command, *s.options, str(script)]


def run_stage(stage: str, executor: Executor, dry_run: bool = False) -> int:
    """Submit the stage as a job and wait for it; returns the exit status for DVC."""
    log_dir = Path(executor.slurm.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script, log = log_dir / f"{stage}-{stamp}.sh", log_dir / f"{stage}-{stamp}.log"
    script.write_text(batch_script(stage, executor))
    command = sbatch_command(stage, executor, script, log)
    print(f"{stage}: {shlex.join(command)} (executor: {executor.source})", flush=True)
    if dry_run:
        print(script.read_text(), end="")
        return 0
    try:
        submitted = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ExecutorError(
            f"{executor.source}: kind: slurm, but sbatch is not on PATH (run where Slurm's "
            "commands are, e.g. a login node)"
        ) from None
    job_id = submitted.stdout.strip().split(";")[0]  # --parsable: id[;cluster]
    if submitted.returncode != 0 or not job_id:
        raise ExecutorError(f"sbatch refused {stage}'s job: {submitted.stderr.strip()}")
    print(f"{stage}: Slurm job {job_id}, log {log}", flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        state, exit_code = wait_for(job_id, log)
    except KeyboardInterrupt:
        subprocess.run(["scancel", job_id], check=False)
        print(f"error: {stage}: interrupted; Slurm job {job_id} cancelled", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if state == "COMPLETED":
        return 0
    print(
        f"error: {stage}: Slurm job {job_id} ended {state or 'unseen (Slurm no longer knows it)'}"
        f"{f' (exit code {exit_code})' if exit_code else ''}; its log: {log}",
        file=sys.stderr,
    )
    status = exit_code.split(":")[0]
    return int(status) if status.isdigit() and int(status) else 1


def wait_for(job_id: str, log: Path) -> tuple[str, str]:
    """Copy the job's log as it grows until the job reaches an end state: (state, exit code)."""
    started = time.monotonic()
    next_query = started
    stream = None
    try:
        while True:
            now = time.monotonic()
            if now >= next_query:
                state, exit_code = job_state(job_id)
                if state not in UNSETTLED:
                    stream = stream or (open(log, "rb") if log.exists() else None)
                    _copy(stream)  # the job has ended: its log is whole
                    return state, exit_code
                next_query = now + min(MAX_QUERY_S, max(QUERY_S, (now - started) / 10))
            if stream is None and log.exists():
                stream = open(log, "rb")
            _copy(stream)
            time.sleep(POLL_S)
    finally:
        if stream is not None:
            stream.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _copy(stream) -> None:
    if stream is None:
        return
    chunk = stream.read()
    if chunk:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


# States a job passes through before its end state (COMPLETING: its processes being killed).
UNSETTLED = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT")
# What scontrol says of a job id it does not know (a job purged MinJobAge after its end; the
# polls above come well within Slurm's default 300 s).
UNKNOWN_JOB = "Invalid job id"


def job_state(job_id: str) -> tuple[str, str]:
    """The job's state and exit code from scontrol; ('', '') once Slurm no longer knows it. A
    failed query (slurmctld busy or restarting) reads as PENDING: ask again later."""
    result = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return ("", "") if UNKNOWN_JOB in result.stderr else ("PENDING", "")
    fields = dict(f.split("=", 1) for f in result.stdout.split() if "=" in f)
    return fields.get("JobState", ""), fields.get("ExitCode", "")
