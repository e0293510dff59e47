"""python -m llmpipe.launch.skypilot gpu [-o sky-gpu.yaml] [--remote s3://bucket/llmpipe]: a
SkyPilot task that runs the pipeline with a preset on a rented GPU box (any cloud or Kubernetes
SkyPilot knows), then `sky launch sky-gpu.yaml`.

The task asks for the machine the preset is sized for (its `machine:` section: GPU type and
count, disk), syncs the repository (git-ignored files stay behind), installs as the README
does (`make setup`), applies the preset, and runs `dvc pull --run-cache`, `dvc repro` with the
torchrun executor (every GPU of the box) and `dvc push --run-cache`: what the box computes goes
to the shared DVC remote with its run-cache, so any clone with the same params then gets every
stage from there (`dvc repro --pull`) instead of computing it again.

Several boxes (`machine.nodes`): every box gets its own copy of the repository and runs the same
`dvc repro`; the stages that train on several processes run across all boxes (torchrun's c10d
rendezvous at the first box's address, from SkyPilot's SKYPILOT_NODE_IPS), and each box writes
their outputs into its own copy (the executor's `shared_filesystem: false`); the other stages run
on every box alike. The first box alone pushes.

SkyPilot itself is not a dependency of llmpipe (its pins, e.g. uvicorn < 0.36, conflict with the
server's): install it apart, e.g. `uv tool install skypilot` or `pipx install skypilot`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import LiteralScalarString

from llmpipe.errors import LlmpipeError
from llmpipe.io import atomic_path
from llmpipe.preset import MACHINE, PRESETS_DIR, available

MACHINE_KEYS = {"accelerators", "disk_size", "nodes", "cloud", "infra", "use_spot"}


class SkyPilotError(LlmpipeError):
    """The preset, its machine or the remote cannot make a task."""


def preset_machine(preset: str) -> dict[str, Any]:
    """The `machine:` section of a preset: what it is sized for (no stage reads it)."""
    path = PRESETS_DIR / f"{preset}.yaml"
    if not path.exists():
        raise SkyPilotError(f"preset {preset!r}: not found (available: {', '.join(available())})")
    machine = (YAML(typ="safe").load(path.read_text()) or {}).get(MACHINE)
    if not isinstance(machine, dict) or "accelerators" not in machine:
        raise SkyPilotError(f"{path}: no machine section with accelerators (e.g. H100:8)")
    if unknown := sorted(set(machine) - MACHINE_KEYS):
        raise SkyPilotError(
            f"{path}: machine.{unknown[0]}: unknown (known: {sorted(MACHINE_KEYS)})"
        )
    nodes = machine.get("nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise SkyPilotError(f"{path}: machine.nodes: {nodes!r} is not a positive integer")
    return machine


RDZV_PORT = 29500  # on the first box, where the boxes meet for each stage that spans them

# The executor of a box among several, written by the task on each box from SkyPilot's
# variables: the first address of SKYPILOT_NODE_IPS is the first box's.
SEVERAL_BOXES = [
    "mkdir -p .llmpipe",
    'first_box=$(echo "$SKYPILOT_NODE_IPS" | head -n1)',
    "printf 'kind: torchrun\\nnodes: %s\\nrdzv_endpoint: %s:%s\\nshared_filesystem: false\\n' "
    f'"$SKYPILOT_NUM_NODES" "$first_box" {RDZV_PORT} > .llmpipe/executor.yaml',
]


def dvc_remote_url(config: Path = Path(".dvc/config")) -> str | None:
    """The default remote's URL from DVC's config (None: none set)."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(config)
    name = parser.get("core", "remote", fallback=None)
    section = f"'remote \"{name}\"'"
    return parser.get(section, "url", fallback=None) if name else None


def task(preset: str, remote: str | None) -> dict[str, Any]:
    machine = preset_machine(preset)
    url = remote or dvc_remote_url()
    if not url or "://" not in url:
        raise SkyPilotError(
            f"the DVC remote is {url or 'not set'}, a folder of this machine that the cloud box "
            "cannot reach: pass --remote s3://bucket/llmpipe (or gs://, azure://, ssh://), or "
            "`dvc remote add -d -f storage <url>` first"
        )
    resources = {key: machine[key] for key in ("accelerators", "disk_size", "cloud", "infra",
                                                "use_spot") if key in machine}  # fmt: skip
    remote_setup = (
        [] if remote is None else [f"dvc remote add --local -d -f shared {shlex.quote(remote)}"]
    )
    nodes = machine.get("nodes", 1)
    run = [
        "set -euo pipefail",
        "source .venv/bin/activate",
        *remote_setup,
        f"python -m llmpipe.preset {shlex.quote(preset)} --write",
        # What any machine has computed with these params comes from the remote's run-cache.
        "dvc pull --run-cache --allow-missing || true",
        *(SEVERAL_BOXES if nodes > 1 else []),
        "dvc repro",
        # Every box computed the same outputs; the first pushes them.
        'if [ "${SKYPILOT_NODE_RANK:-0}" = 0 ]; then dvc push --run-cache; fi'
        if nodes > 1
        else "dvc push --run-cache",
    ]
    return {
        "name": f"llmpipe-{preset}",
        "resources": resources,
        "num_nodes": nodes,
        "workdir": ".",
        # Every GPU of the box for the stages that train on several (llmpipe.launch.executors).
        "envs": {"LLMPIPE_EXECUTOR": "torchrun"},
        "setup": LiteralScalarString("set -euo pipefail\nmake setup\n"),
        "run": LiteralScalarString("\n".join(run) + "\n"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a preset with a machine section, e.g. gpu")
    parser.add_argument("-o", "--output", type=Path, help="default: sky-<preset>.yaml")
    parser.add_argument("--remote", help="the shared DVC remote (default: .dvc/config's)")
    args = parser.parse_args(argv)
    try:
        spec = task(args.preset, args.remote)
    except LlmpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = args.output or Path(f"sky-{args.preset}.yaml")
    yaml = YAML()
    yaml.default_flow_style = False
    with atomic_path(output) as tmp, open(tmp, "w") as f:
        f.write(f"# written by python -m llmpipe.launch.skypilot {args.preset}\n")
        yaml.dump(spec, f)
    print(f"-> {output} (sky launch {output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
