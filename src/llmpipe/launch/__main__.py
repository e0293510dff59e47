"""python -m llmpipe.launch <stage>: run one stage under this machine's executor.

dvc.yaml's command for every stage. The executor comes from `.llmpipe/executor.yaml` or
LLMPIPE_EXECUTOR (llmpipe.launch.executors), not from params: it is not in the stage's hash.
Locally (one process, torchrun, accelerate) this process becomes the stage's command, so its
exit status and signals are the stage's own; under Slurm it submits the job, streams its log
and returns its exit status (llmpipe.launch.slurm).
"""

from __future__ import annotations

import argparse
import os
import sys

from llmpipe import layout
from llmpipe.errors import LlmpipeError
from llmpipe.launch.executors import (
    SPREAD_STAGES,
    describe,
    node_command,
    node_environment,
    read_executor,
    visible_gpus,
)

EXIT_USER_ERROR = 2  # as a stage's own one-line errors (llmpipe.stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=list(layout.STAGES))
    parser.add_argument(
        "--dry-run", action="store_true", help="print the command instead of running it"
    )
    args = parser.parse_args(argv)
    try:
        executor = read_executor()
        kind = executor.kind_of(args.stage)
        if kind == "slurm":
            from llmpipe.launch import slurm

            return slurm.run_stage(args.stage, executor, dry_run=args.dry_run)
        command = node_command(args.stage, executor)
        environment = node_environment(args.stage, executor)
    except LlmpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{args.stage}: {describe(command)} (executor: {executor.source})", flush=True)
    if kind == "local" and args.stage in SPREAD_STAGES and visible_gpus() > 1:
        print(
            f"{args.stage}: trains on one GPU of {visible_gpus()}; `kind: torchrun` in "
            ".llmpipe/executor.yaml (or LLMPIPE_EXECUTOR=torchrun) uses them all, with the same "
            "results (docs/several-boxes.md)",
            file=sys.stderr,
        )
    if args.dry_run:
        return 0
    os.environ.update(environment)
    os.execv(command[0], command)  # the stage's process from here on: its status, its signals


if __name__ == "__main__":
    sys.exit(main())
