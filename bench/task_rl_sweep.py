"""Which learning rate and group size let RL improve the checkable task: task_reinforce's and
task_grpo's recipes from the workspace's task_sft model (`dvc repro task_sft` first), over
learning rates and completions per prompt, at the stages' budget (50 steps of 8 prompts).

Measured on selection problems (train-side problems that task_sft did not draw; never the test
problems the pipeline reports): sampled pass@1 and greedy exact match before and after, the
gains paired over the problems and sampling seeds.

    python bench/task_rl_sweep.py --lr 1e-5 1e-4 3e-4 --generations 4 8 [--completions 32]
        [--lr-schedules constant linear] [--train-seeds 0 1 2] [--unsolved-samples 8]

`--train-seeds`: the RL run's own seed (its prompts and samples), the measurement's staying
fixed, so that the rows show the training noise the paired intervals over problems leave out.
`--unsolved-samples N`: RL on the train problems that the SFT model does not get right in all
of N samples (a difficulty filter: no all-right groups without a gradient).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil

from task_sft_sweep import selection_problems

from llmpipe import layout
from llmpipe.evaluation.intervals import paired_gain
from llmpipe.model.loading import load_causal_lm, load_tokenizer
from llmpipe.params import load_stage_params
from llmpipe.rl.harness import RlRun, train_with_grpo, train_with_reinforce
from llmpipe.task.checkable import (
    TaskMeasure,
    TaskSet,
    answer_tokens,
    exact_match_reward,
    sampled_right,
)
from llmpipe.task.params import TaskGrpoParams, TaskReinforceParams, TaskSftParams

STAGE = "task_rl_sweep"  # its curves go to dvclive/task_rl_sweep, removed at the end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", nargs="+", type=float, default=[1e-5, 1e-4, 3e-4])
    parser.add_argument("--generations", nargs="+", type=int, default=[4])
    parser.add_argument("--completions", type=int, default=32, help="completions a step")
    parser.add_argument("--steps", nargs="+", type=int, default=[50], help="optimizer steps")
    parser.add_argument(
        "--lr-schedules", nargs="+", choices=["constant", "linear"], help="default: the params'"
    )
    parser.add_argument("--algorithms", nargs="+", default=["reinforce", "grpo"])
    parser.add_argument("--selection", type=int, default=200)
    parser.add_argument(
        "--unsolved-samples",
        type=int,
        help="train on the train problems the SFT model does not get right in all of this "
        "many samples (default: every train problem)",
    )
    parser.add_argument(
        "--train-seeds", nargs="+", type=int, help="RL training seeds (default: params' seed)"
    )
    args = parser.parse_args()
    shared, sft = load_stage_params(TaskSftParams)
    task = TaskSet.read(layout.TASK_PROBLEMS)
    _, selection = selection_problems(sft.kind, sft.digits, sft, shared.seed, args.selection)
    on_selection = dataclasses.replace(task, problems={**task.problems, "test": selection})
    tokenizer = load_tokenizer(layout.TASK_SFT_MODEL)
    measure = TaskMeasure(on_selection, tokenizer, 8, 8, shared.seed)
    sft_model = load_causal_lm(layout.TASK_SFT_MODEL)[0]
    before = measure.report(sft_model)
    print(
        f"task_sft on {len(selection)} selection problems: exact match "
        f"{before['exact_match']:.3f}, pass@1 {before['pass_at_1']:.3f}",
        flush=True,
    )
    rl_rows = task.rl_rows()
    if args.unsolved_samples:
        train = task.problems["train"]
        room = answer_tokens(tokenizer, train, task.prompt_format)
        right = sampled_right(
            sft_model,
            tokenizer,
            train,
            task.kind,
            args.unsolved_samples,
            room,
            shared.seed,
            task.prompt_format,
        )
        rl_rows = [row for row, r in zip(rl_rows, right, strict=True) if not all(r)]
        print(f"{len(rl_rows)} of {len(train)} train problems not always solved", flush=True)
    rows = []
    for algorithm in args.algorithms:
        schema, train = {
            "reinforce": (TaskReinforceParams, train_with_reinforce),
            "grpo": (TaskGrpoParams, train_with_grpo),
        }[algorithm]
        _, base = load_stage_params(schema)
        train_seeds = args.train_seeds or [shared.seed]
        schedules = args.lr_schedules or [base.lr_schedule]
        for generations, steps, lr, schedule, train_seed in itertools.product(
            args.generations, args.steps, args.lr, schedules, train_seeds
        ):
            # the same completions a step for every group size
            p = dataclasses.replace(
                base,
                learning_rate=lr,
                lr_schedule=schedule,
                num_generations=generations,
                prompts_per_step=args.completions // generations,
                max_steps=steps,
            )
            run = RlRun(
                policy_dir=layout.TASK_SFT_MODEL,
                rows=rl_rows,
                prompt_format=task.prompt_format,
                rewards=[(exact_match_reward, 1.0)],
                measure=measure,
                before=before,
                gains={},
                load_reference=lambda: load_causal_lm(layout.TASK_SFT_MODEL)[0],
            )
            policy, _, wall_s = train(run, p, train_seed, STAGE)
            after = measure.report(policy)
            pass1 = paired_gain(before, after, "pass_at_1")
            em = paired_gain(before, after, "exact_match")
            rows.append(
                f"| {algorithm} | {generations} x {args.completions // generations} | {steps} "
                f"| {lr:g} {schedule} | {train_seed} | "
                f"{after['pass_at_1']:.3f} | {pass1.text()} | {em.text()} | {wall_s:.0f} |"
            )
            print(rows[-1], flush=True)
    shutil.rmtree(layout.live_dir(STAGE), ignore_errors=True)
    print(
        f"\nBefore RL (task_sft): pass@1 {before['pass_at_1']:.3f}, exact match "
        f"{before['exact_match']:.3f}\n\n"
        "| algorithm | completions x prompts a step | steps | learning rate | training seed | "
        "pass@1 after | pass@1 gain [95%] | exact match gain [95%] | RL wall s |\n"
        "|---|---|---:|---:|---:|---:|---|---|---:|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
