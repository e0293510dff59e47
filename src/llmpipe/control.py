"""The random-reward control of the task's RL stages (Shao et al. 2025, "Spurious Rewards"): the
same RL with a reward that ignores the answer, run as a DVC experiment and recorded for the
report card.

    python -m llmpipe.control [--name control-random-reward] [--rerun]

runs `dvc exp run --temp --name <name> -S task_reinforce.reward=random -S task_grpo.reward=random`
(from the workspace's outputs, only the task RL stages and what reads them rerun; the workspace
is left as it is), or reads the experiment where one of that name exists on this commit. Then it
writes, per stage, the control's gains with their intervals and its per-problem results to
metrics/task_control.json (in git: the report stage reads it). The report card prints them
beside the checker's gains, and pairs the two: both runs start from the same SFT model and
measure with the same sampling seeds, so their per-problem results after RL pair problem by
problem. A record whose per-problem results before RL differ from the workspace's (another SFT
model, another machine's numbers) is shown as stale, not paired.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from llmpipe import layout
from llmpipe.errors import DataError
from llmpipe.io import rounded, write_json

STAGES = ("task_reinforce", "task_grpo")
DEFAULT_NAME = "control-random-reward"
# what the record keeps of each stage's metrics: the gains and the reward's probability
KEPT = ("reward", "random_reward_probability", "steps", "completions_sampled")
GAINS = ("pass_at_1_gain", "exact_match_gain")


def experiment_ref(name: str) -> str | None:
    """The ref of the experiment `name` on this commit's baseline, if it exists."""
    from llmpipe.compare import experiment_refs

    refs = experiment_refs("HEAD").get(name, [])
    return refs[0] if refs else None


def run_control(name: str) -> str:
    """Run the control experiment (its stages' output streams through) and return its ref."""
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name]
    for stage in STAGES:
        command += ["-S", f"{stage}.reward=random"]
    print(" ".join(command[2:]), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: the control experiment {name!r} failed (see above)")
    ref = experiment_ref(name)
    if ref is None:
        raise SystemExit(f"error: the control experiment {name!r} ran but has no ref")
    return ref


def read_json_at(ref: str, path) -> dict | list:
    from llmpipe.compare import _git_file

    text = _git_file(ref, path)
    if text is None:
        raise DataError(f"{ref}: no {path}")
    return json.loads(text)


def record(ref: str, name: str) -> dict:
    """What metrics/task_control.json holds, read from the experiment's commit."""
    stages = {}
    for stage in STAGES:
        metrics = read_json_at(ref, layout.metrics_file(stage))
        if metrics.get("reward") != "random":
            raise DataError(f"{name}: {stage} did not run with the random reward")
        kept = {key: metrics[key] for key in KEPT if key in metrics}
        for gain in GAINS:
            kept.update({k: metrics[k] for k in (gain, f"{gain}_lo", f"{gain}_hi")})
        kept["items"] = read_json_at(ref, layout.items_file(stage))
        stages[stage] = kept
    return {"experiment": name, "stages": stages}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="the experiment's name")
    parser.add_argument(
        "--rerun", action="store_true", help="run the experiment again where it exists"
    )
    args = parser.parse_args(argv)
    ref = experiment_ref(args.name)
    if ref is not None and args.rerun:
        subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", args.name], check=True)
        ref = None
    if ref is None:
        ref = run_control(args.name)
    else:
        print(f"reading the existing experiment {args.name} ({ref}); --rerun runs it again")
    control = rounded(record(ref, args.name))
    write_json(layout.TASK_CONTROL, control)
    for stage, kept in control["stages"].items():
        print(
            f"{stage}, random reward: pass@1 gain {kept['pass_at_1_gain']:+.3f} "
            f"[{kept['pass_at_1_gain_lo']:+.3f}, {kept['pass_at_1_gain_hi']:+.3f}]"
        )
    print(f"-> {layout.TASK_CONTROL} (commit it; `dvc repro report` shows it)")


if __name__ == "__main__":
    main()
