"""Push the cache with the run-cache, so that another clone restores any stage run seen here.

    python -m llmpipe.share [--remote NAME]      # make push

DVC's run-cache records every stage run (its deps, params and outputs). A clone that has those
records and the outputs they name restores a stage instead of running it, even for a
combination of params that no commit holds (`dvc pull --run-cache`, then `dvc repro --pull`).
But `dvc push --run-cache` sends the records alone (DVC 3, treeverse/dvc#10472): the outputs
they name travel only when a pushed commit uses them, and the uncached ones (metrics, curves)
never, so the other clone cannot restore and reruns. This pushes the data, the records, and
every object the records name.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_cache_entries(repo) -> list[tuple[str, str]]:
    """(key, value) of every run recorded in the local run-cache."""
    runs = Path(repo.stage_cache.cache_dir)
    return [(entry.parent.name, entry.name) for entry in sorted(runs.glob("*/*/*"))]


def push(remote: str | None = None) -> tuple[int, int]:
    """The data of the workspace's commit, the run-cache's records and the outputs they name;
    returns (objects the records added, objects that could not be pushed)."""
    from dvc.repo import Repo

    with Repo() as repo:
        repo.push(run_cache=True, remote=remote)
        used = repo.stage_cache.get_used_objs(run_cache_entries(repo))
        pushed = failed = 0
        for odb, objects in used.items():
            result = repo.cloud.push(objects, remote=remote, odb=odb)
            pushed, failed = pushed + len(result.transferred), failed + len(result.failed)
    return pushed, failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.share",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--remote", help="a DVC remote (default: the one .dvc/config names)")
    args = parser.parse_args(argv)
    pushed, failed = push(args.remote)
    if failed:
        raise SystemExit(
            f"error: {failed} objects that the run-cache names could not be "
            "pushed (missing from the local cache, e.g. after dvc gc?)"
        )
    print(f"pushed the data, the run-cache and {pushed} objects its runs name")


if __name__ == "__main__":
    main()
