"""Noise bars: the pipeline (or the stages from a given one on) over several seeds, per variant,
as DVC experiments, and each headline figure as mean and standard deviation.

    python -m llmpipe.seeds --seeds 3 --from lora --variant lora.r=8 --variant lora.r=16

queues `dvc exp run --queue -S seed=<s> [-S <variant>] [--downstream <stage>]` for every seed
and variant, runs the queue one experiment at a time (`dvc exp run --run-all -j 1`: two torch
jobs at once would slow both many times over), then reads `dvc exp show --json`. With `--from`,
the stages before it keep the workspace's outputs and only that stage and what follows it rerun
under each seed: the noise of, say, LoRA's training alone. Experiments are named
`seeds-<variant>-s<seed>`; one that exists already (same baseline commit) is read, not rerun,
so a second call with more seeds only runs the new ones. `--report` reads without running.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence

# (metrics file, key, what it is): the figures a comparison is read on.
HEADLINE = (
    ("metrics/pretrain.json", "val_perplexity", "pretrain val perplexity"),
    ("metrics/finetune.json", "val_perplexity", "finetune val perplexity"),
    ("metrics/lora.json", "val_perplexity", "lora val perplexity"),
    ("metrics/quantize.json", "int8_val_perplexity", "int8 val perplexity"),
    ("metrics/reward_model.json", "heldout_accuracy", "reward model held-out accuracy"),
    ("metrics/grpo.json", "gold_gain", "grpo gold gain"),
    ("metrics/grpo.json", "after_kl_per_token", "grpo KL per token"),
    ("metrics/reinforce.json", "gold_gain", "reinforce gold gain"),
    ("metrics/reinforce.json", "after_kl_per_token", "reinforce KL per token"),
    ("metrics/task_sft.json", "exact_match", "task SFT exact match"),
    ("metrics/task_reinforce.json", "after_exact_match", "task REINFORCE exact match"),
    ("metrics/task_grpo.json", "after_exact_match", "task GRPO exact match"),
)


def _dvc(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def experiment_name(variant: Sequence[str], seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", "_".join(variant)).strip("-") or "baseline"
    return f"seeds-{slug}-s{seed}"


def is_baseline_seed(name: str) -> bool:
    """Whether an experiment is one seed of the workspace's params (no variant)."""
    return re.fullmatch(r"seeds-baseline-s\d+", name) is not None


def _experiments(show: list) -> Iterator[tuple[str, dict]]:
    """(name, data) of every experiment that finished in `dvc exp show --json`'s nested answer
    (a failed one shows its baseline's metrics: left out)."""
    for entry in show:
        for experiment in entry.get("experiments") or ():
            for rev in experiment.get("revs") or ():
                failed = (rev.get("data") or {}).get("error") or (rev.get("executor") or {}).get(
                    "state"
                ) == "failed"
                if rev.get("name") and rev.get("data") and not failed:
                    yield rev["name"], rev["data"]


def headline_figures(data: dict) -> dict[str, float]:
    metrics = data.get("metrics") or {}
    figures = {}
    for path, key, title in HEADLINE:
        value = (metrics.get(path) or {}).get("data", {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            figures[title] = float(value)
    return figures


def aggregate(
    show: list, variants: Sequence[Sequence[str]], seeds: Sequence[int]
) -> dict[str, dict[str, list[float]]]:
    """{variant: {figure: [value per seed that finished]}}."""
    found = dict(_experiments(show))
    table: dict[str, dict[str, list[float]]] = {}
    for variant in variants:
        label = " ".join(variant) or "baseline"
        table[label] = {}
        for seed in seeds:
            for title, value in headline_figures(
                found.get(experiment_name(variant, seed), {})
            ).items():
                table[label].setdefault(title, []).append(value)
    return table


def format_table(table: dict[str, dict[str, list[float]]]) -> str:
    titles = [t for _, _, t in HEADLINE if any(t in figures for figures in table.values())]
    lines = ["| figure | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    for title in titles:
        cells = []
        for figures in table.values():
            values = figures.get(title, [])
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4g} (1 seed)")
            else:
                cells.append(
                    f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g} "
                    f"({len(values)} seeds)"
                )
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def queue(variants: Sequence[Sequence[str]], seeds: Sequence[int], start: str | None) -> int:
    """Queue the experiments that do not exist yet; returns how many."""
    existing = {name for name, _ in _experiments(json.loads(_dvc("exp", "show", "--json")))}
    queued = 0
    for variant in variants:
        for seed in seeds:
            name = experiment_name(variant, seed)
            if name in existing:
                continue
            sets = [arg for s in (f"seed={seed}", *variant) for arg in ("-S", s)]
            # The queue runs each experiment in a fresh copy of the repository, where only the
            # stages it runs get their inputs: the earlier stages' outputs are copied in.
            target = ["--downstream", start, "--copy-paths", "data"] if start else []
            _dvc("exp", "run", "--queue", "--name", name, *sets, *target)
            queued += 1
    return queued


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.seeds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (from --first-seed)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--from", dest="start", metavar="STAGE", help="rerun this stage and what follows it only"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'K=V [K=V ...]'",
        help="params of one variant (repeatable); none: the workspace's params",
    )
    parser.add_argument("--report", action="store_true", help="read, queue and run nothing")
    args = parser.parse_args(argv)
    if args.seeds < 2 and not args.report:
        parser.error("--seeds: a standard deviation needs at least 2")
    variants = [v.split() for v in args.variant] or [[]]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if not args.report and queue(variants, seeds, args.start):
        # One at a time: two torch jobs on the same cores slow each other many times over.
        # DVC follows the runs' logs: on stderr, so that stdout is the table alone.
        subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "run", "--run-all", "-j", "1"],
            check=True,
            stdout=sys.stderr,
        )
    print(format_table(aggregate(json.loads(_dvc("exp", "show", "--json")), variants, seeds)))


if __name__ == "__main__":
    main()
