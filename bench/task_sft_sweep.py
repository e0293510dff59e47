"""Which checkable task, and how much SFT, a small model learns: task_sft's recipe on the
pretrained model of the workspace (data/pretrain/model, `dvc repro pretrain` first), over task
kinds, steps and learning rates.

Measured on a selection set: train-side problems that SFT does not see (the problems not drawn
for training, by the same seeded rule), never the test problems that the pipeline reports.

    python bench/task_sft_sweep.py --kinds add add_reversed --steps 300 1000 --lr 1e-3 3e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
import time
from pathlib import Path

import yaml

from llmpipe import layout
from llmpipe.data.chat import PLAIN
from llmpipe.evaluation.intervals import estimate
from llmpipe.model.loading import load_causal_lm
from llmpipe.params import load_stage_params
from llmpipe.task.checkable import _is_test, all_problems, make_problems, run_sft, task_report
from llmpipe.task.params import TaskSftParams

TEST_FRACTION = 0.2  # make_problems's default: the share of possible problems on the test side


def selection_problems(kind: str, digits: int, p: TaskSftParams, seed: int, count: int):
    """(the train problems task_sft draws, `count` other train-side problems): the selection
    problems are on the train side of the seeded split and were not drawn for training."""
    drawn = make_problems(kind, digits, p.train_problems, p.test_problems, seed)["train"]
    seen = {q.prompt for q in drawn}
    rest = [
        q
        for q in all_problems(kind, digits)
        if not _is_test(q, seed, TEST_FRACTION) and q.prompt not in seen
    ]
    return drawn, random.Random(seed).sample(rest, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["add", "add_reversed"])
    parser.add_argument("--steps", nargs="+", type=int, default=[300])
    parser.add_argument("--lr", nargs="+", type=float, default=[1e-3])
    parser.add_argument("--selection", type=int, default=200)
    parser.add_argument(
        "--set", nargs="*", default=[], help="other task_sft params: key=value (batch_size=64)"
    )
    args = parser.parse_args()
    shared, p = load_stage_params(TaskSftParams)
    changes = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    p = dataclasses.replace(p, **changes)
    print(f"task_sft with {changes or 'its params'}", flush=True)
    rows = []
    for kind in args.kinds:
        train, selection = selection_problems(kind, p.digits, p, shared.seed, args.selection)
        for steps in args.steps:
            for lr in args.lr:
                q = dataclasses.replace(
                    p, kind=kind, max_steps=steps, learning_rate=lr, base=str(layout.PRETRAIN_MODEL)
                )
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as live:
                    model, _ = run_sft(q, train, PLAIN, shared.seed, Path(live))
                wall = time.perf_counter() - started
                _, tokenizer = load_causal_lm(layout.PRETRAIN_MODEL)
                report = task_report(model, tokenizer, selection, kind, 2, 8, shared.seed)
                em = estimate([i["exact_match"] for i in report["items"]])
                rows.append(
                    f"| {kind} | {steps} | {lr:g} | {em.mean:.3f} [{em.lo:.3f}, {em.hi:.3f}] | "
                    f"{report['pass_at_1']:.3f} | {report['teacher_forced_token_accuracy']:.3f} "
                    f"| {wall:.0f} |"
                )
                print(rows[-1], flush=True)
    print(
        "\n| kind | steps | learning rate | exact match, selection problems [95%] | "
        "pass@1 (8 samples) | teacher-forced token accuracy | SFT wall s |\n"
        "|---|---:|---:|---|---:|---:|---:|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
