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


def push(remote: str | None = None) -> int:
    """The data of the workspace's commit, the run-cache's records and the outputs they name;
    returns how many objects the records added."""
    from dvc.repo import Repo

    with Repo() as repo:
        repo.push(run_cache=True, remote=remote)
        used = repo.stage_cache.get_used_objs(run_cache_entries(repo))
        pushed = 0
        for odb, objects in used.items():
            pushed += len(repo.cloud.push(objects, remote=remote, odb=odb).transferred)
    return pushed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remote", help="a DVC remote (default: the one .dvc/config names)")
    args = parser.parse_args(argv)
    print(f"pushed the data, the run-cache and {push(args.remote)} objects its runs name")


if __name__ == "__main__":
    main()
