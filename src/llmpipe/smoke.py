"""Run the whole chain once, stage after stage, without DVC: the GPU smoke run.

    python -m llmpipe.smoke gpu-smoke                  # make gpu-smoke
    python -m llmpipe.smoke gpu-smoke --wheels wheels  # first install what is missing from there
    python -m llmpipe.smoke gpu-smoke --set pretrain.max_steps=50 --set grpo.max_steps=5

GPU clusters are often air-gapped and bring their own PyTorch stack, without DVC and without
some of llmpipe's pure-Python dependencies. So this runner needs neither DVC nor
`pip install -e .`: it runs from the repository with the project on PYTHONPATH, installs the
distributions of pyproject.toml that are missing from a folder of wheels made beforehand on a
connected machine (`make smoke-wheels`), composes params.yaml with the preset (and --set
overrides) into a run directory, runs `<launcher> -m stages.<name>` there for every stage in
dvc.yaml's order, and prints each stage's wall time with pretrain's tokens/s and MFU. The run
directory gets the outputs, metrics and `smoke.json`, the table.

Only the standard library (and llmpipe's own errors and stage modules) is imported until the
wheels are in.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from llmpipe import layout
from llmpipe.errors import LlmpipeError

ROOT = Path(__file__).resolve().parents[2]  # the repository: stages/ and src/
# In dvc.yaml's order (tests/test_smoke.py checks it against layout.STAGES).
STAGES = tuple(layout.STAGES)  # dvc.yaml's order (tests/test_smoke.py)


class SmokeError(LlmpipeError):
    """A step of the smoke run failed; the message says which and how."""


def requirement_specs(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """pyproject.toml's dependencies but torch, which a GPU box brings (built for its CUDA)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [dep for dep in deps if distribution_name(dep) != "torch"]


def distribution_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]


def requirements() -> list[str]:
    """The distribution names required, versions left to what is installed: the point is to
    run on the box's own stack."""
    return [distribution_name(spec) for spec in requirement_specs()]


def missing_distributions(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def install_from_wheels(missing: list[str], wheels: Path) -> None:
    """pip, offline, from the folder only; what is installed already stays."""
    if not wheels.is_dir():
        raise SmokeError(f"--wheels {wheels}: no such directory (make it on a connected machine "
                         "with `make smoke-wheels`)")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
               str(wheels), *missing]
    print(f"installing {', '.join(missing)} from {wheels}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise SmokeError(f"pip could not install {', '.join(missing)} from {wheels}: the folder "
                         "lacks them or a dependency of theirs (see pip's message above)")


def parse_override(text: str) -> tuple[str, object]:
    """key=value, the value read as YAML (numbers, booleans, null, lists)."""
    import yaml  # PyYAML comes with transformers

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SmokeError(f"--set {text!r}: expected key=value, e.g. pretrain.max_steps=50")
    return key, yaml.safe_load(value)


def compose_params(preset: str, overrides: list[str], run_dir: Path) -> dict:
    """run_dir/params.yaml: the repository's params.yaml, the preset, then the overrides;
    validated as every stage will read it."""
    from llmpipe.io import atomic_path
    from llmpipe.params import read_params_file, validate_mapping
    from llmpipe.preset import compose, load_preset, set_dotted

    composed = compose(read_params_file(ROOT / "params.yaml"), load_preset(preset))
    for text in overrides:
        set_dotted(composed, *parse_override(text))
    validate_mapping(composed, f"params.yaml + {preset}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "params.yaml") as tmp:
        tmp.write_text(json.dumps(composed, indent=2))  # JSON is YAML
    return composed


# Launchers as modules of this interpreter, the one the wheels went into (a `torchrun` on PATH
# may belong to another Python).
LAUNCHER_MODULES = {"python": [], "python3": [], "torchrun": ["-m", "torch.distributed.run"],
                    "accelerate": ["-m", "accelerate.commands.accelerate_cli"]}


def stage_command(stage: str, params: dict) -> list[str]:
    """The stage's launcher from params (python for the stages that have none), as dvc.yaml
    runs it, through this interpreter."""
    program, *options = shlex.split(params[stage].get("launcher", "python"))
    return [sys.executable, *LAUNCHER_MODULES[program], *options, "-m", f"stages.{stage}"]


def run_stages(params: dict, run_dir: Path, stages: tuple[str, ...] = STAGES) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"),
                                         *filter(None, [env.get("PYTHONPATH")])])
    rows = []
    for stage in stages:
        command = stage_command(stage, params)
        print(f"\n== {stage}: {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(command, cwd=run_dir, env=env).returncode
        rows.append({"stage": stage, "wall_s": round(time.perf_counter() - started, 1)})
        if code != 0:
            raise SmokeError(f"stage {stage} failed with exit status {code} after "
                             f"{rows[-1]['wall_s']} s (its output is above; outputs of the "
                             f"stages before it are in {run_dir})")
    return rows


def pretrain_figures(run_dir: Path) -> dict:
    perf = json.loads((run_dir / "metrics/pretrain.json").read_text())["perf"]
    return {key: perf[key] for key in ("tokens_per_s", "mfu", "peak_flops", "device", "dtype",
                                       "processes")}


def table(rows: list[dict], pretrain: dict) -> str:
    lines = ["| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {r['stage']} | {r['wall_s']:.1f} |" for r in rows]
    lines.append(f"| **all** | {sum(r['wall_s'] for r in rows):.1f} |")
    lines.append("")
    lines.append(f"pretrain: {pretrain['tokens_per_s']:,.0f} tokens/s, MFU "
                 f"{100 * pretrain['mfu']:.1f}% of {pretrain['peak_flops']:.3g} FLOP/s "
                 f"({pretrain['device']}, {pretrain['dtype']}, {pretrain['processes']} "
                 "process(es))")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", help="a preset of src/llmpipe/presets, e.g. "
                        "gpu-smoke")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param after the preset (repeatable)")
    parser.add_argument("--wheels", type=Path,
                        help="install missing dependencies from this folder of wheels")
    parser.add_argument("--run-dir", type=Path, help="default: runs/<preset>")
    parser.add_argument("--print-requirements", action="store_true",
                        help="print the requirements to download as wheels, and stop")
    args = parser.parse_args(argv)
    if args.print_requirements:
        print(shlex.join(requirement_specs()))
        return
    if args.preset is None:
        parser.error("a preset is required (e.g. gpu-smoke)")

    missing = missing_distributions(requirements())
    if missing and args.wheels is not None:
        install_from_wheels(missing, args.wheels)
        missing = missing_distributions(missing)
    if missing:
        raise SmokeError(f"missing: {', '.join(missing)} (give --wheels <folder>, a folder made "
                         "on a connected machine with `make smoke-wheels`)")
    run_dir = (args.run_dir or ROOT / "runs" / args.preset).resolve()
    params = compose_params(args.preset, args.set, run_dir)
    started = time.perf_counter()
    rows = run_stages(params, run_dir)
    pretrain = pretrain_figures(run_dir)
    summary = {"preset": args.preset, "overrides": args.set, "stages": rows,
               "wall_s": round(time.perf_counter() - started, 1), "pretrain": pretrain}
    (run_dir / "smoke.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{table(rows, pretrain)}\n-> {run_dir / 'smoke.json'}")


if __name__ == "__main__":
    from llmpipe.stage import run_main

    run_main(main)
