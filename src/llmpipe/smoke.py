"""Run the whole chain once, stage after stage, without DVC: the GPU smoke run.

    python -m llmpipe.smoke gpu-smoke                  # make gpu-smoke
    python -m llmpipe.smoke gpu-smoke --wheels wheels  # first install what is missing from there
    python -m llmpipe.smoke gpu-smoke --set pretrain.max_steps=50 --set grpo.max_steps=5
    python -m llmpipe.smoke gpu-smoke --cpu-rehearsal  # the same run at micro shapes on a CPU

GPU clusters are often air-gapped and bring their own PyTorch stack, without DVC and without
some of llmpipe's pure-Python dependencies. So this runner needs neither DVC nor
`pip install -e .`: it runs from the repository with the project on PYTHONPATH, installs the
distributions of pyproject.toml that are missing from a folder of wheels made beforehand on a
connected machine (`make smoke-wheels`), composes params.yaml with the preset (and --set
overrides) into a run directory, runs `python -m llmpipe.launch <name>` there (dvc.yaml's
command: the stage under this machine's executor, llmpipe.launch) for every stage in
dvc.yaml's order, and prints each stage's wall time with pretrain's tokens/s and MFU. The run
directory gets the outputs, metrics and `smoke.json`, the table, rewritten after every stage
(a run stopped by a time limit still says how far it got). scripts/gpu_check.sh runs it.

Only the standard library (and llmpipe's own errors and stage modules) is imported until the
wheels are in.
"""

from __future__ import annotations

import argparse
import importlib
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
from llmpipe.io import write_json

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


# pyproject.toml's dependencies that no stage needs: the server's stack, and vl-convert-python,
# without which the report card is written without images. The smoke kit leaves them out
# (scripts/gpu_kit.py, NOT_CARRIED; tests/test_gpu_kit.py checks the two agree).
NOT_FOR_STAGES = ("fastapi", "uvicorn", "httptools", "uvloop", "sse-starlette", "vl-convert-python")


def requirements() -> list[str]:
    """The distribution names the stages need, versions left to what is installed: the point is
    to run on the box's own stack."""
    return [
        name for name in map(distribution_name, requirement_specs()) if name not in NOT_FOR_STAGES
    ]


def missing_distributions(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def install_from_wheels(wheels: Path, target: Path) -> None:
    """The kit (`make smoke-wheels`) as scripts/gpu_check.py installs it: every wheel of the
    folder, offline and --no-deps (the kit is exactly what the machine lacks), into `target`,
    which goes on the path of this process and of the stages, before the machine's own
    site-packages; the machine's installation is left as it is."""
    if not wheels.is_dir():
        raise SmokeError(
            f"--wheels {wheels}: no such directory (make it on a connected machine "
            "with `make smoke-wheels`)"
        )
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--quiet",
        "--target",
        str(target),
        *map(str, sorted(wheels.glob("*.whl"))),
    ]
    print(f"installing the kit in {wheels} into {target}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise SmokeError(f"pip could not install the wheels of {wheels} (see pip's message above)")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(target), os.environ.get("PYTHONPATH")])
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()


# The pipeline at micro shapes, for a CPU: seconds per stage on 2 cores. The smoke run's CPU
# rehearsal and the tests' micro workspace (tests/conftest.py) both start from it.
MICRO_SHAPES = {
    "download.pretrain.max_documents": 1500,
    "download.finetune.max_documents": 20,
    "tokenize.vocab_size": 512,
    "pretrain.model.n_layer": 2,
    "pretrain.model.n_head": 2,
    "pretrain.model.n_embd": 32,
    "pretrain.model.block_size": 32,
    "pretrain.batch_size": 8,
    "pretrain.max_steps": 12,
    "pretrain.warmup_steps": 2,
    "pretrain.eval_interval": 6,
    "pretrain.eval_windows": 8,
    "pretrain.checkpoint_interval": 6,
    "pretrain.sample.max_new_tokens": 8,
    **{
        f"{stage}.{key}": value
        for stage in ("finetune", "lora")
        for key, value in {
            "block_size": 32,
            "batch_size": 8,
            "warmup_steps": 2,
            "eval_windows": 8,
        }.items()
    },
    "quantize.block_size": 32,
    "quantize.eval_windows": 8,
    "quantize.batch_size": 8,
    "quantize.generate_tokens": 4,
    "preferences.train_prompts": 32,
    "preferences.heldout_prompts": 6,  # all the smoke corpus's val split has (distinct stems)
    "preferences.samples_per_prompt": 8,
    "preferences.completion_tokens": 8,
    "reward_model.max_length": 48,
    "reward_model.batch_size": 8,
    "rl_baseline.eval_samples": 1,
    "rl_baseline.max_completion_length": 8,
    "grpo.max_steps": 2,
    "grpo.prompts_per_step": 2,
    "grpo.max_completion_length": 8,
    "grpo.curve_interval": 1,
    "grpo.curve_prompts": 2,
    **{
        f"reinforce.{key}": value
        for key, value in {
            "max_steps": 2,
            "prompts_per_step": 2,
            "max_completion_length": 8,
            "curve_interval": 1,
            "curve_prompts": 2,
        }.items()
    },
    "task_sft.train_problems": 64,
    "task_sft.test_problems": 16,
    "task_sft.pass_k": 2,
    "task_sft.pass_samples": 2,
    "task_sft.max_steps": 10,
    "task_sft.batch_size": 8,
    **{
        f"{stage}.{key}": value
        for stage in ("task_reinforce", "task_grpo")
        for key, value in {"max_steps": 2, "prompts_per_step": 2, "num_generations": 2}.items()
    },
    "evaluate.block_size": 32,
    "evaluate.eval_windows": 8,
    "evaluate.batch_size": 8,
    "evaluate.samples_per_prompt": 1,
    "evaluate.completion_tokens": 8,
    "evaluate.generate_tokens": 4,
    "evaluate.sample.max_new_tokens": 8,
}


# The gpu-smoke preset scaled down to a CPU: the same stages and code paths at micro shapes, in
# float32, uncompiled (--cpu-rehearsal; scripts/gpu_check.sh --dry-run).
CPU_REHEARSAL = {
    **MICRO_SHAPES,
    "pretrain.model.vocab_multiple": 1,
    "pretrain.grad_accum_steps": 1,
    "pretrain.device": "cpu",
    "pretrain.dtype": "float32",
    "pretrain.compile": False,
    # GPT-2 124M's rate (the preset's 6e-4) leaves a 32-wide model near uniform after 12 steps,
    # and then every preference completion ties: micro shapes take the embedded default's
    "pretrain.learning_rate": 3.0e-3,
    "pretrain.min_lr": 3.0e-4,
    **{
        f"{stage}.{key}": value
        for stage in ("finetune", "lora")
        for key, value in {"max_steps": 10, "eval_interval": 5}.items()
    },
    "quantize.compile": False,
    "quantize.device": "cpu",
}


def parse_override(text: str) -> tuple[str, object]:
    """key=value, the value read as YAML (numbers, booleans, null, lists)."""
    import yaml  # PyYAML comes with transformers

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SmokeError(f"--set {text!r}: expected key=value, e.g. pretrain.max_steps=50")
    return key, yaml.safe_load(value)


def compose_params(
    preset: str, overrides: list[str], run_dir: Path, cpu_rehearsal: bool = False
) -> dict:
    """run_dir/params.yaml: the repository's params.yaml, the preset, CPU_REHEARSAL if asked
    for, then the overrides; validated as every stage will read it."""
    from llmpipe.io import atomic_path
    from llmpipe.params import read_params_file
    from llmpipe.pipeline import validate_mapping
    from llmpipe.preset import compose, load_preset, set_dotted

    composed = compose(read_params_file(ROOT / "params.yaml"), load_preset(preset))
    for key, value in (CPU_REHEARSAL if cpu_rehearsal else {}).items():
        set_dotted(composed, key, value)
    for text in overrides:
        set_dotted(composed, *parse_override(text))
    validate_mapping(composed, f"params.yaml + {preset}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "params.yaml") as tmp:
        tmp.write_text(json.dumps(composed, indent=2))  # JSON is YAML
    return composed


def stage_command(stage: str) -> list[str]:
    """dvc.yaml's command for the stage, through this interpreter (the one the wheels went
    into): the executor comes from this machine's setting (llmpipe.launch.executors)."""
    return [sys.executable, "-m", "llmpipe.launch", stage]


def run_stages(
    run_dir: Path, stages: tuple[str, ...] = STAGES, after_stage=lambda rows: None
) -> list[dict]:
    """Each stage in a process of its own; `after_stage(rows)` after each one (and after a
    failure, before the error)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    rows = []
    for stage in stages:
        command = stage_command(stage)
        print(f"\n== {stage}: {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(command, cwd=run_dir, env=env).returncode
        rows.append(
            {"stage": stage, "wall_s": round(time.perf_counter() - started, 1), "exit_code": code}
        )
        after_stage(rows)
        if code != 0:
            raise SmokeError(
                f"stage {stage} failed with exit status {code} after "
                f"{rows[-1]['wall_s']} s (its output is above; outputs of the "
                f"stages before it are in {run_dir})"
            )
    return rows


def pretrain_figures(run_dir: Path) -> dict | None:
    path = run_dir / layout.metrics_file("pretrain")
    if not path.exists():
        return None
    perf = json.loads(path.read_text())["perf"]
    return {
        key: perf[key]
        for key in ("tokens_per_s", "mfu", "peak_flops", "device", "dtype", "processes")
    }


def table(rows: list[dict], pretrain: dict) -> str:
    lines = ["| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {r['stage']} | {r['wall_s']:.1f} |" for r in rows]
    lines.append(f"| **all** | {sum(r['wall_s'] for r in rows):.1f} |")
    lines.append("")
    if pretrain is None:
        return "\n".join(lines)
    mfu = (
        "n/a"
        if pretrain["mfu"] is None
        else f"{100 * pretrain['mfu']:.1f}% of {pretrain['peak_flops']:.3g} FLOP/s"
    )
    lines.append(
        f"pretrain: {pretrain['tokens_per_s']:,.0f} tokens/s, MFU {mfu} "
        f"({pretrain['device']}, {pretrain['dtype']}, {pretrain['processes']} "
        "process(es))"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.smoke",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("preset", nargs="?", help="a preset of src/llmpipe/presets, e.g. gpu-smoke")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param after the preset (repeatable)",
    )
    parser.add_argument(
        "--wheels", type=Path, help="install missing dependencies from this folder of wheels"
    )
    parser.add_argument("--run-dir", type=Path, help="default: runs/<preset>")
    parser.add_argument(
        "--cpu-rehearsal",
        action="store_true",
        help="the preset at micro shapes on the CPU (CPU_REHEARSAL), before --set",
    )
    args = parser.parse_args(argv)
    if args.preset is None:
        parser.error("a preset is required (e.g. gpu-smoke)")

    run_dir = (args.run_dir or ROOT / "runs" / args.preset).resolve()
    missing = missing_distributions(requirements())
    if missing and args.wheels is not None:
        install_from_wheels(args.wheels, run_dir / "kit")
        missing = missing_distributions(missing)
    if missing:
        raise SmokeError(
            f"missing: {', '.join(missing)} (give --wheels <folder>, a folder made "
            "on a connected machine with `make smoke-wheels`)"
        )
    compose_params(args.preset, args.set, run_dir, args.cpu_rehearsal)
    started = time.perf_counter()

    def write_summary(rows: list[dict], finished: bool = False) -> dict:
        summary = {
            "preset": args.preset,
            "cpu_rehearsal": args.cpu_rehearsal,
            "overrides": args.set,
            "stages": rows,
            "finished": finished,
            "wall_s": round(time.perf_counter() - started, 1),
            "pretrain": pretrain_figures(run_dir),
        }
        write_json(run_dir / "smoke.json", summary)
        return summary

    rows = run_stages(run_dir, after_stage=write_summary)
    summary = write_summary(rows, finished=True)
    print(f"\n{table(rows, summary['pretrain'])}\n-> {run_dir / 'smoke.json'}")


if __name__ == "__main__":
    from llmpipe.stage import run_main

    run_main(main)
