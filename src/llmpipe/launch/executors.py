"""The executor setting, and the command that runs a stage under it.

The setting is this machine's, not the pipeline's: `.llmpipe/executor.yaml` (git-ignored; looked
for in the working directory and its parents, so DVC's temporary experiment workspaces under
.dvc/tmp find the repository's), or the file LLMPIPE_EXECUTOR_FILE names. LLMPIPE_EXECUTOR
overrides its `kind`. Without either, stages run locally, one process each.

    kind: torchrun          # local | torchrun | accelerate | slurm
    processes: gpu          # per node, for the stages that train on several: N, or gpu
    nodes: 1                # torchrun over several boxes: each runs the command (rdzv_endpoint)
    rdzv_endpoint: null     # several nodes: host:port of node 0 (c10d rendezvous)
    shared_filesystem: true # several nodes: false when each box has its own copy (SkyPilot)
    accelerate_config: null # accelerate: its --config_file (e.g. configs/accelerate/fsdp.yaml)
    stages: {download: local}   # a kind per stage, over `kind`
    slurm: {partition: gpu, nodes: 2, gpus_per_node: 8, time: "04:00:00"}   # slurm.py

The stages that train on every process the executor starts (SPREAD_STAGES) keep their global
batch whatever the count, and their results agree across counts to 1e-4 relative
(tests/test_launchers.py). GRPO's completions depend on the count (TRL seeds each process apart),
so for COUNTED_STAGES the count is a param (`<stage>.processes`, in the stage's hash) and every
executor starts exactly that many. The other stages run in one process under every executor.

Across boxes, rank 0 writes a stage's outputs into the repository that every box sees (a
cluster's shared file system). Boxes that each have their own copy (`shared_filesystem: false`:
rented cloud boxes, llmpipe.launch.skypilot) each run the whole `dvc repro`: the other stages run
on every box alike, the spread ones across all boxes, and each box's first process writes the
outputs into its own copy, once every process has checked that its box's inputs are the first
box's (stage.check_inputs_agree).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

from llmpipe import layout
from llmpipe.errors import LlmpipeError
from llmpipe.stage import INPUTS_DIGEST, OUTPUTS_ON_EACH_NODE

SETTINGS_FILE = Path(".llmpipe/executor.yaml")
KINDS = ("local", "torchrun", "accelerate", "slurm")
SPREAD_STAGES = ("pretrain", "finetune", "lora", "reward_model")
COUNTED_STAGES = ("grpo", "task_grpo")


class ExecutorError(LlmpipeError):
    """The executor setting is wrong, or the executor could not run the stage."""


@dataclasses.dataclass(frozen=True)
class SlurmSettings:
    """sbatch's options for a stage's job (slurm.py)."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int | None = None  # --gpus-per-node; `processes: gpu` then means this many
    time: str | None = None  # --time, e.g. 04:00:00
    cpus_per_task: int | None = None
    # torchrun agents that srun starts, one per node: `nodes` unless set. Two on one node run
    # the several-node path on a single machine (tests/test_slurm.py).
    tasks: int | None = None
    options: tuple[str, ...] = ()  # any other sbatch option, e.g. ["--account=proj"]
    log_dir: str = ".llmpipe/slurm"  # each job's log, streamed while it runs
    master_port: int = 29500  # node 0's rendezvous port for several nodes


@dataclasses.dataclass(frozen=True)
class Executor:
    kind: str = "local"
    processes: int | str = "gpu"
    nodes: int = 1
    rdzv_endpoint: str | None = None
    shared_filesystem: bool = True
    # How long torchrun's agents wait for every box at a stage's rendezvous: boxes with their
    # own copies reach a stage each at their own pace, after running every stage before it.
    rdzv_join_timeout_s: int = 1800
    accelerate_config: str | None = None
    stages: dict[str, str] = dataclasses.field(default_factory=dict)
    slurm: SlurmSettings = SlurmSettings()
    source: str = "the default (no .llmpipe/executor.yaml)"  # for messages

    def kind_of(self, stage: str) -> str:
        return self.stages.get(stage, self.kind)


def find_settings(start: Path) -> Path | None:
    """`.llmpipe/executor.yaml` in start or the nearest parent that has one."""
    for directory in (start, *start.parents):
        if (directory / SETTINGS_FILE).is_file():
            return directory / SETTINGS_FILE
    return None


def read_executor(cwd: Path | None = None, environ=None) -> Executor:
    environ = os.environ if environ is None else environ
    named = environ.get("LLMPIPE_EXECUTOR_FILE")
    path = Path(named) if named else find_settings((cwd or Path.cwd()).resolve())
    raw: dict[str, Any] = {}
    source = "the default (no .llmpipe/executor.yaml)"
    if path is not None:
        if not path.is_file():
            raise ExecutorError(f"LLMPIPE_EXECUTOR_FILE: {path}: file not found")
        try:
            raw = YAML(typ="safe").load(path.read_text()) or {}
        except YAMLError as e:
            raise ExecutorError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(raw, dict):
            raise ExecutorError(f"{path}: a mapping of settings is expected")
        source = str(path)
    if environ.get("LLMPIPE_EXECUTOR"):
        raw = {**raw, "kind": environ["LLMPIPE_EXECUTOR"]}
        source = f"LLMPIPE_EXECUTOR={environ['LLMPIPE_EXECUTOR']} over {source}"
    return parse_executor(raw, source)


def parse_executor(raw: dict, source: str) -> Executor:
    """Check every field, naming the file and the field of a bad one."""

    def fail(field: str, value: Any, what: str) -> ExecutorError:
        return ExecutorError(f"{source}: {field}: {value!r} is not {what}")

    def positive(field: str, value: Any, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(field, value, "a positive integer")
        return value

    def text(field: str, value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise fail(field, value, "a string")
        return value

    top = {f.name for f in dataclasses.fields(Executor)} - {"source"}
    if unknown := sorted(set(raw) - top):
        raise ExecutorError(f"{source}: unknown setting {unknown[0]!r} (known: {sorted(top)})")
    kind = raw.get("kind", "local")
    if kind not in KINDS:
        raise fail("kind", kind, f"an executor: {', '.join(KINDS)}")
    processes = raw.get("processes", "gpu")
    if processes != "gpu":
        positive("processes", processes)
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict):
        raise fail("stages", stages, "a mapping of stage to executor")
    for stage, stage_kind in stages.items():
        if stage not in layout.STAGES:
            raise fail(f"stages.{stage}", stage, f"a stage ({', '.join(layout.STAGES)})")
        if stage_kind not in KINDS:
            raise fail(f"stages.{stage}", stage_kind, f"an executor: {', '.join(KINDS)}")
    slurm_raw = raw.get("slurm") or {}
    if not isinstance(slurm_raw, dict):
        raise fail("slurm", slurm_raw, "a mapping of sbatch settings")
    known = {f.name for f in dataclasses.fields(SlurmSettings)}
    if unknown := sorted(set(slurm_raw) - known):
        raise ExecutorError(
            f"{source}: unknown setting slurm.{unknown[0]} (known: {sorted(known)})"
        )
    options = slurm_raw.get("options") or ()
    if isinstance(options, str) or not all(isinstance(o, str) for o in options):
        raise fail("slurm.options", options, "a list of sbatch options")
    slurm = SlurmSettings(
        partition=text("slurm.partition", slurm_raw.get("partition")),
        nodes=positive("slurm.nodes", slurm_raw.get("nodes", 1)),
        gpus_per_node=positive("slurm.gpus_per_node", slurm_raw.get("gpus_per_node"), True),
        time=text("slurm.time", slurm_raw.get("time")),
        cpus_per_task=positive("slurm.cpus_per_task", slurm_raw.get("cpus_per_task"), True),
        tasks=positive("slurm.tasks", slurm_raw.get("tasks"), True),
        options=tuple(options),
        log_dir=text("slurm.log_dir", slurm_raw.get("log_dir", SlurmSettings.log_dir)),
        master_port=positive("slurm.master_port", slurm_raw.get("master_port", 29500)),
    )
    nodes = positive("nodes", raw.get("nodes", 1))
    endpoint = text("rdzv_endpoint", raw.get("rdzv_endpoint"))
    if nodes > 1 and not endpoint:
        raise fail("rdzv_endpoint", endpoint, f"set: {nodes} nodes need node 0's host:port")
    shared_filesystem = raw.get("shared_filesystem", True)
    if not isinstance(shared_filesystem, bool):
        raise fail("shared_filesystem", shared_filesystem, "true or false")
    if not shared_filesystem and (others := {kind, *stages.values()} & {"accelerate", "slurm"}):
        raise fail(
            "shared_filesystem",
            shared_filesystem,
            f"possible with the {sorted(others)[0]} executor (only torchrun runs across boxes "
            "that each have their own copy)",
        )
    return Executor(
        kind=kind,
        processes=processes,
        nodes=nodes,
        rdzv_endpoint=endpoint,
        shared_filesystem=shared_filesystem,
        rdzv_join_timeout_s=positive("rdzv_join_timeout_s", raw.get("rdzv_join_timeout_s", 1800)),
        accelerate_config=text("accelerate_config", raw.get("accelerate_config")),
        stages=dict(stages),
        slurm=slurm,
        source=source,
    )


def counted_processes(stage: str, params_file: Path = Path("params.yaml")) -> int:
    """`<stage>.processes` from params.yaml, for COUNTED_STAGES (the stage checks its type)."""
    try:
        section = (YAML(typ="safe").load(params_file.read_text()) or {}).get(stage) or {}
    except (OSError, YAMLError):
        return 1  # the stage itself reports what is wrong with params.yaml
    count = section.get("processes", 1)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1


def visible_gpus() -> int:
    """GPUs this process may use, read without CUDA (the launch starts no torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def processes_per_node(executor: Executor, gpus: int | None = None) -> int:
    if executor.processes != "gpu":
        return int(executor.processes)
    gpus = visible_gpus() if gpus is None else gpus
    if gpus < 1:
        raise ExecutorError(
            f"{executor.source}: processes: 'gpu', but no GPU is visible here; set processes "
            "to a number (several CPU processes train with gloo)"
        )
    return gpus


def stage_module(stage: str) -> list[str]:
    return ["-m", f"stages.{stage}"]


def torchrun(
    nproc: int,
    nodes: int = 1,
    endpoint: str | None = None,
    rdzv_id: str = "",
    join_timeout_s: int = 1800,
) -> list:
    """torchrun's own options, as a module of this interpreter (a `torchrun` on PATH may belong
    to another Python)."""
    where = (
        ["--standalone"]
        if nodes == 1
        else ["--nnodes", str(nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
              "--rdzv_id", rdzv_id, "--rdzv_conf", f"join_timeout={join_timeout_s}"]
    )  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(nproc)]


def node_command(stage: str, executor: Executor, gpus: int | None = None) -> list[str]:
    """The command that runs the stage on this machine (the one process, or this node's share
    of processes); slurm.py wraps it in a job."""
    kind = executor.kind_of(stage)
    one_process = [sys.executable, *stage_module(stage)]
    if stage in COUNTED_STAGES:
        count = counted_processes(stage)
        return torchrun(count) + stage_module(stage) if count > 1 else one_process
    if stage not in SPREAD_STAGES or kind == "local":
        return one_process
    if kind == "slurm":
        raise ExecutorError(f"{stage}: a Slurm job's command is slurm.batch_script's")
    nproc = processes_per_node(executor, gpus)
    if kind == "accelerate":
        config = ["--config_file", executor.accelerate_config] if executor.accelerate_config else []
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *config,
            "--num_processes",
            str(nproc * executor.nodes),
            *stage_module(stage),
        ]
    nodes = executor.nodes if kind == "torchrun" else 1
    return torchrun(
        nproc, nodes, executor.rdzv_endpoint, f"llmpipe-{stage}", executor.rdzv_join_timeout_s
    ) + stage_module(stage)


def across_own_copies(stage: str, executor: Executor) -> bool:
    """The stage runs across boxes that each have their own copy of the repository."""
    return (
        stage in SPREAD_STAGES
        and executor.kind_of(stage) == "torchrun"
        and executor.nodes > 1
        and not executor.shared_filesystem
    )


def node_environment(stage: str, executor: Executor, dvc_yaml: Path = Path("dvc.yaml")) -> dict:
    """What the stage's processes need beside the command: across boxes with their own copies,
    that each box writes, and this box's inputs to check against the first box's."""
    if not across_own_copies(stage, executor):
        return {}
    return {OUTPUTS_ON_EACH_NODE: "1", INPUTS_DIGEST: json.dumps(inputs_digest(stage, dvc_yaml))}


def inputs_digest(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, str]:
    """{path: md5} of the stage's deps in dvc.yaml (a folder: of its files' names and contents)
    and of params.yaml, as they are in this copy of the repository."""
    try:
        deps = YAML(typ="safe").load(dvc_yaml.read_text())["stages"][stage].get("deps") or []
    except (OSError, YAMLError, KeyError, TypeError) as e:
        raise ExecutorError(f"{dvc_yaml}: no deps of stage {stage} to check ({e})") from e
    root = dvc_yaml.parent
    return {str(dep): md5_of(root / dep) for dep in [*deps, "params.yaml"]}


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode() + b"\0")
        if not file.exists():
            digest.update(b"missing")
            continue
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "md5").digest())
    return digest.hexdigest()


def describe(command: list[str]) -> str:
    return shlex.join(["python" if c == sys.executable else c for c in command])
