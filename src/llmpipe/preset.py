"""Presets: named overrides of params.yaml (src/llmpipe/presets/<name>.yaml), applied through
DVC's own `-S` mechanism, so a preset run is an ordinary, comparable DVC experiment.

    python -m llmpipe.preset gpu            # validate, then: dvc exp run -S ++key=value ...
    python -m llmpipe.preset gpu -- -n gpu1 # the same, with more dvc exp run arguments
    python -m llmpipe.preset gpu --write    # write the composed params.yaml (then dvc repro)
    python -m llmpipe.preset gpu --print    # print the -S arguments only
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmpipe.errors import ParamsError
from llmpipe.params import PARAMS_FILE, flatten, read_params_file
from llmpipe.pipeline import validate_mapping

PRESETS_DIR = Path(__file__).parent / "presets"
# A preset's one section that is not params: the machine it is sized for (GPU type and count,
# disk), which llmpipe.launch.skypilot asks a cloud for. No stage reads it.
MACHINE = "machine"


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    from ruamel.yaml import YAML

    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ParamsError(f"preset {name!r}: not found (available: {', '.join(available())})")
    overrides = YAML(typ="safe").load(path.read_text()) or {}
    overrides.pop(MACHINE, None)
    return overrides


def set_dotted(mapping: dict, dotted: str, value: Any) -> None:
    """mapping["a"]["b"] = value for dotted "a.b", creating missing levels."""
    *parents, last = dotted.split(".")
    for key in parents:
        mapping = mapping.setdefault(key, {})
    mapping[last] = value


def compose(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    composed = copy.deepcopy(base)
    for dotted, value in flatten(overrides):
        set_dotted(composed, dotted, value)
    return composed


def set_arguments(overrides: dict[str, Any]) -> list[str]:
    # `++key=value`: Hydra's add-or-override (DVC applies -S through Hydra, in struct mode, so
    # a plain key=value fails for a key params.yaml does not have yet). JSON is YAML: each
    # value comes back as the same string, number, list or null.
    return [
        arg
        for dotted, value in flatten(overrides)
        for arg in ("-S", f"++{dotted}={json.dumps(value)}")
    ]


def write_params(overrides: dict[str, Any], path: Path = PARAMS_FILE) -> None:
    from ruamel.yaml import YAML

    from llmpipe.io import atomic_path

    yaml = YAML()  # round-trip: comments and order of params.yaml stay
    data = yaml.load(path.read_text())
    for dotted, value in flatten(overrides):
        set_dotted(data, dotted, value)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.dump(data, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.preset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help=f"one of: {', '.join(available())}")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite params.yaml")
    action.add_argument("--print", action="store_true", help="print the -S arguments")
    argv = sys.argv[1:] if argv is None else argv
    dvc_args = argv[argv.index("--") + 1 :] if "--" in argv else []  # for dvc exp run
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    overrides = load_preset(args.name)
    validate_mapping(compose(read_params_file(), overrides), f"params.yaml + {args.name}")
    if args.print:
        print(" ".join(f"'{a}'" if a != "-S" else a for a in set_arguments(overrides)))
    elif args.write:
        write_params(overrides)
        print(f"params.yaml: preset {args.name!r} applied; run `dvc repro`")
    else:
        command = [sys.executable, "-m", "dvc", "exp", "run", *set_arguments(overrides), *dvc_args]
        sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    from llmpipe.stage import run_main

    run_main(main)
