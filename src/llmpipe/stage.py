"""What every stage entry point shares: one-line errors and a non-zero exit."""

from __future__ import annotations

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
