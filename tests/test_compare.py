"""The PR comment's headline table (llmpipe.compare): paired differences of per-item results
between two revisions, labelled with Holm's correction."""

import random
import statistics

import pytest

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


def test_the_seeds_spread_widens_the_interval_of_a_small_shift():
    rng = random.Random(4)
    base = [4.0 + rng.gauss(0, 0.3) for _ in range(64)]
    windows = lambda losses: {i: {"window": i, "after_loss": v} for i, v in enumerate(losses)}  # noqa: E731
    shifted = {"finetune": windows([v - 0.02 for v in base])}
    [alone] = headline_rows({"finetune": windows(base)}, shifted)
    [seeded] = headline_rows(
        {"finetune": windows(base)}, shifted, {("finetune", "after_loss"): 0.05}
    )
    assert alone.verdict == "better"  # the same windows, 0.02 nats lower on each: sure...
    assert seeded.verdict == "within noise"  # ...but seeds move the loss by 0.05 nats
    assert seeded.difference.se == pytest.approx((alone.difference.se**2 + 2 * 0.05**2) ** 0.5)


def test_an_experiment_name_resolves_to_its_ref_and_seed_experiments_give_the_spread(
    tmp_path, monkeypatch
):
    import json
    import subprocess

    from llmpipe import compare, layout

    monkeypatch.chdir(tmp_path)
    git = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "0")
    for seed, loss in enumerate([4.0, 4.1, 4.2]):  # as DVC keeps experiments: one ref each
        path = layout.items_file("finetune")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"window": 0, "after_loss": loss}]))
        git("add", "-f", str(path))
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"s{seed}")
        head = git("rev-parse", "HEAD").stdout.strip()
        git("reset", "-q", "--hard", "HEAD~1")
        base = git("rev-parse", "HEAD").stdout.strip()  # DVC files an experiment by baseline
        prefix = f"refs/exps/{base[:2]}/{base[2:]}"
        git("update-ref", f"{prefix}/seeds-baseline-s{seed}", head)
    assert compare.resolve("seeds-baseline-s1") == f"{prefix}/seeds-baseline-s1"
    assert compare.resolve("HEAD") == "HEAD"
    with pytest.raises(SystemExit, match="neither a git revision nor a DVC experiment"):
        compare.resolve("no-such-experiment")
    spread, seeds = compare.seed_spread("HEAD")
    assert seeds == 3 and spread == {("finetune", "after_loss"): pytest.approx(0.1)}
    # the same name on another baseline: ambiguous by name, and not this baseline's spread
    git("update-ref", "refs/exps/cd/ef/seeds-baseline-s1", head)
    with pytest.raises(SystemExit, match="names experiments of 2 baselines"):
        compare.resolve("seeds-baseline-s1")
    assert compare.seed_spread("HEAD")[1] == 3


def test_micro_finetunes_differing_in_seed_are_within_noise_and_learning_rate_0_is_worse(
    micro_pretrained, tmp_path
):
    """Real runs: the micro finetune under three seeds (the seeds command's spread), a fourth
    seed compared with the first, and a run whose learning rate is 0 (nothing learned)."""
    import dataclasses

    from llmpipe import layout
    from llmpipe.params import load_stage_params
    from llmpipe.pipeline import STAGE_SCHEMAS
    from llmpipe.train.causal_lm import run_stage

    _, p = load_stage_params(STAGE_SCHEMAS["finetune"], micro_pretrained / "params.yaml")
    p = dataclasses.replace(
        p,
        base=str(micro_pretrained / layout.PRETRAIN_MODEL),
        block_size=32,
        batch_size=8,
        max_steps=20,
        eval_interval=10,
        eval_windows=16,
        warmup_steps=2,
        learning_rate=3e-3,
    )

    def finetune(seed: int, learning_rate: float) -> dict:
        q = dataclasses.replace(p, learning_rate=learning_rate)
        work = tmp_path / f"{seed}-{learning_rate}"
        run = run_stage(
            "finetune", q, seed, micro_pretrained / layout.tokens("finetune"), work, work / "live"
        )
        return {
            "finetune": {i["window"]: {**i, "after_loss": i["loss"]} for i in run.score.items()}
        }

    seeds = [finetune(seed, 3e-3) for seed in (0, 1, 2)]
    means = [sum(r["after_loss"] for r in s["finetune"].values()) / 16 for s in seeds]
    spread = {("finetune", "after_loss"): statistics.stdev(means)}
    [reseeded] = headline_rows(seeds[0], finetune(3, 3e-3), spread)
    [broken] = headline_rows(seeds[0], finetune(0, 0.0), spread)
    assert reseeded.paired and reseeded.seeds_widened and reseeded.verdict == "within noise"
    assert broken.verdict == "worse" and broken.difference.mean > 0  # the loss of the base
