"""What every stage entry point shares: one-line errors and a non-zero exit, the GPUs a stage
sees, and the end of a launcher's process group."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmpipe import layout
from llmpipe.errors import LlmpipeError

EXIT_USER_ERROR = 2
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU, read without CUDA


def run_main(main: Callable[[], Any]) -> None:
    """Run a stage's main(); a user-fixable error prints one line and exits with status 2.

    Anything else is a bug in llmpipe and keeps its traceback.
    """
    one_gpu_unless_launched(running_stage())
    try:
        main()
    except LlmpipeError as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process stops; one says why
            print(f"error: {e}{way_back(os.environ.get('DVC_STAGE'))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        end_distributed()


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
