"""What every stage entry point shares: one-line errors and a non-zero exit, the GPUs a stage
sees, and the end of a launcher's process group."""

from __future__ import annotations

import datetime
import gc
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmpipe import layout
from llmpipe.errors import DataError, LlmpipeError

EXIT_USER_ERROR = 2
# Set by the launcher (llmpipe.launch.executors) when a stage runs across boxes that each have
# their own copy of the repository (the executor's `shared_filesystem: false`, as SkyPilot's
# cloud boxes): each box's DVC needs the stage's outputs in its own copy (runtime.writes_outputs).
OUTPUTS_ON_EACH_NODE = "LLMPIPE_OUTPUTS_ON_EACH_NODE"
# With it, the digest of the stage's inputs on this box (JSON {path: md5}):
# check_inputs_agree below.
INPUTS_DIGEST = "LLMPIPE_INPUTS_DIGEST"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU, read without CUDA


def run_main(main: Callable[[], Any]) -> None:
    """Run a stage's main(); a user-fixable error prints one line and exits with status 2.

    Anything else is a bug in llmpipe and keeps its traceback.
    """
    one_gpu_unless_launched(running_stage())
    try:
        if os.environ.get(INPUTS_DIGEST):  # across boxes with their own copies
            check_inputs_agree()
        main()
    except LlmpipeError as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process stops; one says why
            print(f"error: {e}{way_back(os.environ.get('DVC_STAGE'))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        end_distributed()


def check_inputs_agree(timeout_s: float = 600) -> None:
    """Every process of a run across boxes with their own copies checks that its box's inputs
    are the first box's: each box ran the stages before this one by itself, so a stage that is
    not bit-reproducible (a GPU kernel with atomics, a download that changed) could otherwise
    feed one run different data on different boxes. Through the store torchrun gives its
    workers (MASTER_ADDR/MASTER_PORT), before any process group exists."""
    from torch.distributed import PrefixStore, TCPStore

    store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    compare_inputs(
        PrefixStore(f"llmpipe/inputs/{attempt}", store),
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        f"{os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})",
        json.loads(os.environ[INPUTS_DIGEST]),
    )


def compare_inputs(store, rank: int, size: int, box: str, inputs: dict[str, str]) -> None:
    """Publish this process's {path: md5} and compare every process's with rank 0's."""
    store.set(str(rank), json.dumps({"box": box, "inputs": inputs}))
    first, *others = (json.loads(store.get(str(r))) for r in range(size))
    for other in others:
        for path in sorted(set(first["inputs"]) | set(other["inputs"])):
            theirs, ours = other["inputs"].get(path), first["inputs"].get(path)
            if theirs != ours:
                raise DataError(
                    f"{path}: not the same on box {other['box']} as on box {first['box']} "
                    f"(md5 {theirs} vs {ours}): each box computed the stages before this one "
                    "by itself, and they gave other files; run those on one box and "
                    "`dvc push --run-cache`, so that every box pulls the same files "
                    "(docs/several-boxes.md)"
                )


def running_stage() -> str:
    """The stage that `python -m stages.<name>` runs ('' elsewhere)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    name = spec.name if spec is not None else ""
    return name.removeprefix("stages.") if name.startswith("stages.") else ""


def way_back(stage: str | None) -> str:
    """How to get a failed stage's previous outputs back. `dvc repro` deletes a stage's outputs
    before running it (DVC sets DVC_STAGE then); the cached ones are in DVC's cache, the
    metrics and curves in git. Empty outside DVC, where a failure leaves every output intact."""
    if stage not in layout.STAGES:
        return ""
    git_paths = " ".join(str(path) for path in layout.STAGES[stage].git_outputs(stage))
    return (
        f" (dvc repro removed this stage's previous outputs; to get them back: "
        f"dvc checkout {stage} && git checkout -- {git_paths})"
    )


def one_gpu_unless_launched(stage: str) -> None:
    """A stage started as one process uses one GPU, and says so on a box with several:
    transformers' Trainer would otherwise wrap the model in nn.DataParallel over every GPU
    (one process, a batch silently multiplied by the GPU count), and TRL's trainers refuse
    several GPUs. CUDA reads the variable when it starts, so this runs before any CUDA call."""
    if not stage or "WORLD_SIZE" in os.environ:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # a scheduler may have set several
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip()])
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0]
    else:
        gpus = len(list(NVIDIA_GPUS.iterdir())) if NVIDIA_GPUS.is_dir() else 0
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    if gpus > 1:
        print(
            f"{stage}: {gpus} GPUs visible, using the first (one process; the executor "
            "decides how many a stage runs on: docs/several-boxes.md)",
            file=sys.stderr,
        )


def end_distributed() -> None:
    """Tear down the process group a launcher's run made (pretrain's loop, or a trainer's).
    Garbage goes first: a DDP reducer collected after the group is destroyed can run gloo's
    destructor with the GIL held while a gloo thread waits for the GIL, a hang
    (pytorch/pytorch#56297); destroy_process_group drops the group's last reference with the
    GIL released."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        gc.collect()
        distributed.destroy_process_group()
