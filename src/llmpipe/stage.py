"""What every stage entry point shares: one-line errors and a non-zero exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from llmpipe.errors import LlmpipeError

EXIT_USER_ERROR = 2


def run_main(main: Callable[[], Any]) -> None:
    """Run a stage's main(); a user-fixable error prints one line and exits with status 2.

    Anything else is a bug in llmpipe and keeps its traceback.
    """
    try:
        main()
    except LlmpipeError as e:
        print(f"error: {e}{way_back(os.environ.get('DVC_STAGE'))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def way_back(stage: str | None) -> str:
    """How to get a failed stage's previous outputs back. `dvc repro` deletes a stage's outputs
    before running it (DVC sets DVC_STAGE then); the cached ones are in DVC's cache, the
    metrics and curves in git. Empty outside DVC, where a failure leaves every output intact."""
    from llmpipe import layout

    if stage not in layout.STAGES:
        return ""
    git_paths = " ".join(str(path) for path in layout.STAGES[stage].git_outputs(stage))
    return (f" (dvc repro removed this stage's previous outputs; to get them back: "
            f"dvc checkout {stage} && git checkout -- {git_paths})")


def use_one_gpu_unless_launched() -> None:
    """TRL's trainers refuse several GPUs without a distributed launcher: outside one, a stage
    that uses them sees the first GPU only. Call before torch is imported."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
