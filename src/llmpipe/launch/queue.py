"""python -m llmpipe.launch.queue --devices 0,1,2,3 [--per-experiment 1]: run the experiments
queued with `dvc exp run --queue`, as many at once as the device groups allow, each seeing only
its own group (CUDA_VISIBLE_DEVICES).

DVC's own queue runs them. `dvc queue start -j N` starts N workers (`dvc exp queue-worker`)
that inherit one environment; this starts one worker per device group with that group's
CUDA_VISIBLE_DEVICES. Each worker takes one queued experiment at a time, runs it in its own
temporary workspace under .dvc/tmp/exps and records it as DVC does, so the results are in
`dvc exp show` as if `dvc queue start` had run them. The workers stop once the queue is empty.

Starting workers at the same moment can make an experiment's set-up race another's (DVC issue
10673: parallel queue workers fail at random); each worker here starts once the previous one's
experiment is under way. A failed experiment is reported with its log (`dvc queue logs`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from llmpipe.errors import LlmpipeError

STAGGER_TIMEOUT_S = 120  # the longest wait for a worker's experiment to start before the next
POLL_S = 1.0


class QueueError(LlmpipeError):
    """The device list or the queue's state does not allow a run."""


def device_groups(devices: str, per_experiment: int) -> list[str]:
    """'0,1,2,3' in groups of 2 -> ['0,1', '2,3']."""
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or len(set(ids)) != len(ids):
        raise QueueError(f"--devices: {devices!r} is not a list of distinct device ids (0,1,2,3)")
    if per_experiment < 1 or len(ids) % per_experiment:
        raise QueueError(
            f"--per-experiment: {len(ids)} devices do not divide into groups of {per_experiment}"
        )
    return [",".join(ids[i : i + per_experiment]) for i in range(0, len(ids), per_experiment)]


def worker_command(queue, number: int) -> list[str]:
    """The worker `dvc queue start` would start as its number-th, named as DVC names it (so that
    a `dvc queue start` meanwhile sees it running and `dvc queue stop` stops it)."""
    wdir_hash = hashlib.sha256(queue.wdir.encode("utf-8")).hexdigest()[:6]
    dvc = Path(sys.executable).with_name("dvc")
    return [str(dvc), "exp", "queue-worker", f"dvc-exp-{wdir_hash}-{number}@localhost"]


def run_queue(groups: list[str], root: Path = Path(".")) -> int:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        queue = repo.experiments.celery_queue
        queued = list(queue.iter_queued())
        if not queued:
            print("nothing queued (dvc exp run --queue -S ... queues an experiment)")
            return 0
        if queue.worker_status():
            raise QueueError(
                "DVC queue workers are running already (dvc queue status; dvc queue stop)"
            )
        groups = groups[: len(queued)]
        print(f"{len(queued)} queued experiments on {len(groups)} device groups: {groups}")
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        workers = []
        for number, group in enumerate(groups, start=1):
            log = open(Path(queue.wdir) / f"dvc-exp-worker-{number}.out", "ab")  # noqa: SIM115
            workers.append(
                subprocess.Popen(
                    worker_command(queue, number),
                    cwd=repo.root_dir,
                    env={**env, "CUDA_VISIBLE_DEVICES": group},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # its own session: `dvc queue kill` signals an experiment's process group,
                    # which must not be this command's or another worker's
                    start_new_session=True,
                )
            )
            log.close()
            print(f"worker {number}: CUDA_VISIBLE_DEVICES={group}", flush=True)
            if number < len(groups):
                wait_until_started(queue, workers[-1], number)
        for worker in workers:
            worker.wait()
        return report(queue, queued)


def wait_until_started(queue, worker: subprocess.Popen, running: int) -> None:
    """Until `running` experiments have started (or none is left, or the worker stopped)."""
    deadline = time.monotonic() + STAGGER_TIMEOUT_S
    while time.monotonic() < deadline and worker.poll() is None:
        started = sum(1 for entry in queue.iter_active() if queue.proc.get(entry.stash_rev))
        if started >= running or not any(True for _ in queue.iter_queued()):
            return
        time.sleep(POLL_S)


def report(queue, queued) -> int:
    """Each queued experiment's outcome; non-zero if any failed."""
    revs = {entry.stash_rev for entry in queued}
    succeeded = {r.entry.stash_rev: r for r in queue.iter_success() if r.entry.stash_rev in revs}
    failed = [entry for entry in queued if entry.stash_rev not in succeeded]
    for entry in queued:
        result = succeeded.get(entry.stash_rev)
        if result is not None:
            print(f"{result.result.ref_info.name}: done (dvc exp show)")
        else:
            print(f"{entry.name or entry.stash_rev[:7]}: failed (dvc queue logs {entry.name})")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", required=True, help="device ids, e.g. 0,1,2,3")
    parser.add_argument("--per-experiment", type=int, default=1, help="devices an experiment gets")
    args = parser.parse_args(argv)
    try:
        return run_queue(device_groups(args.devices, args.per_experiment))
    except LlmpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
