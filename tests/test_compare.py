"""The PR comment's headline table (llmpipe.compare): paired differences of per-item results
between two revisions, labelled with Holm's correction."""

import random

from llmpipe.compare import headline_rows
from llmpipe.evaluation.report import gain_text


def items(values, prefix="problem"):
    return {f"{prefix} {i}": {"after_exact_match": v} for i, v in enumerate(values)}


def test_same_items_are_paired_and_a_rerun_is_within_noise():
    rng = random.Random(0)
    run = [float(rng.random() < 0.4) for _ in range(200)]
    [row] = headline_rows({"task_sft": items(run)}, {"task_sft": items(list(run))})
    assert row.paired and row.difference.se == 0 and row.difference.mean == 0
    assert row.verdict == "within noise"


def test_another_seed_is_within_noise_and_a_broken_run_is_worse():
    rng = random.Random(1)
    base = [float(rng.random() < 0.4) for _ in range(200)]
    reseeded = [float(rng.random() < 0.4) for _ in range(200)]  # the same skill, other draws
    broken = [0.0] * 200  # e.g. learning rate 0: nothing learned
    rows = headline_rows(
        {"task_sft": items(base), "task_grpo": items(base)},
        {"task_sft": items(reseeded), "task_grpo": items(broken)},
    )
    verdicts = {r.label: r.verdict for r in rows}
    assert verdicts == {"task SFT exact match": "within noise", "task GRPO exact match": "worse"}


def test_different_items_are_compared_unpaired():
    [row] = headline_rows(
        {"task_sft": items([1.0, 0.0] * 50, "old")}, {"task_sft": items([1.0] * 100, "new")}
    )
    assert not row.paired and row.difference.mean == 0.5 and row.verdict == "better"


def test_the_report_says_within_noise_when_the_interval_covers_zero():
    m = {"gain": 0.02, "gain_lo": -0.01, "gain_hi": 0.05, "big": 0.1, "big_lo": 0.05}
    assert gain_text(m, "gain") == "+0.020 [-0.010, +0.050], within noise"
    assert gain_text({**m, "big_hi": 0.15}, "big").endswith(", up")
    assert gain_text({"bare": 0.1}, "bare") == "+0.1 (no interval)"


def test_a_loss_that_fell_is_better():
    windows = lambda losses: {i: {"window": i, "after_loss": v} for i, v in enumerate(losses)}  # noqa: E731
    rng = random.Random(3)
    base = [4.0 + rng.gauss(0, 0.3) for _ in range(64)]
    [row] = headline_rows(
        {"finetune": windows(base)}, {"finetune": windows([v - 0.05 for v in base])}
    )
    assert row.paired and row.verdict == "better" and row.difference.mean < 0
