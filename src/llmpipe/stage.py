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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def use_one_gpu_unless_launched() -> None:
    """TRL's trainers refuse several GPUs without a distributed launcher: outside one, a stage
    that uses them sees the first GPU only. Call before torch is imported."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
