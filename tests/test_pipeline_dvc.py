"""The DVC workflow, end to end, on a copy of the project with the micro configuration."""

import csv
import io
import json

import pytest

from conftest import MICRO_PARAMS, git_commit_all, run, set_params
from llmpipe import layout, seeds

pytestmark = pytest.mark.slow

STAGES = tuple(layout.STAGES)  # dvc.yaml's stages, in its order (test_dvc_yaml)
MODELS = ("pretrain", "finetune", "lora", "quantized", "grpo", "reinforce")
FIGURES = (
    "val_perplexity_pretrain",
    "val_perplexity_finetune",
    "val_bits_per_byte_pretrain",
    "val_bits_per_byte_finetune",
    "reward_model_score",
    "gold_score",
    "kl_to_finetune",
    "size_mb",
)
# Bits per byte beside every perplexity, in each stage's metrics.
BITS_PER_BYTE = {
    "pretrain": ["val_bits_per_byte"],
    "finetune": ["base_val_bits_per_byte", "val_bits_per_byte"],
    "lora": ["base_val_bits_per_byte", "val_bits_per_byte"],
    "quantize": ["fp32_val_bits_per_byte", "int8_val_bits_per_byte"],
}


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def exp_rows(repo) -> list[dict]:
    return list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo).stdout)))


def test_the_experiment_workflow(micro_repro, reproduced_project):
    repo = reproduced_project

    # The whole chain ran (micro_repro), then the report card and one comparable table.
    assert ran(micro_repro[1]) == set(STAGES)
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    for model in MODELS:
        assert set(FIGURES) <= set(evaluate[model]), model
        assert evaluate["perf"][model]["generate_tokens_per_s"] > 0
        assert evaluate["perf"][model]["device"] == "cpu"  # where its figures come from
    assert json.loads((repo / "metrics/quantize.json").read_text())["perf"]["device"] == "cpu"
    assert evaluate["finetune"]["kl_to_finetune"] == 0
    for stage, keys in BITS_PER_BYTE.items():
        figures = json.loads((repo / f"metrics/{stage}.json").read_text())
        assert all(0 < figures[key] < 8 for key in keys), (stage, figures)
    # Perplexities with their intervals over the validation windows, kept per window.
    for stage, key in (
        ("pretrain", "val_perplexity"),
        ("finetune", "val_perplexity"),
        ("lora", "val_perplexity"),
        ("quantize", "int8_val_perplexity"),
    ):
        m = json.loads((repo / f"metrics/{stage}.json").read_text())
        assert m[f"{key}_lo"] < m[key] < m[f"{key}_hi"], stage
        windows = json.loads((repo / f"metrics/items/{stage}.json").read_text())
        assert len(windows) > 1 and "window" in windows[0], stage
    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    assert (
        finetune["val_loss_change_lo"]
        <= finetune["val_loss_change"]
        <= finetune["val_loss_change_hi"]
    )
    # A sample estimate (the mean log-ratio over sampled tokens): exactly 0 for the finetuned
    # model itself, nonzero once GRPO moved the policy; after two micro steps its sign is noise.
    assert evaluate["grpo"]["kl_to_finetune"] != 0
    assert evaluate["quantized"]["size_mb"] < 0.5 * evaluate["finetune"]["size_mb"]
    report = (repo / "data/report/report.md").read_text()
    table = report.split("## Every model")[1].split("\n\n")[1]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == list(MODELS)
    assert (repo / "data/report/curve_pretrain.png").exists()
    # The harness's shipped offline task on every model, beside chance in the report.
    assert all(0 <= evaluate[model]["llmpipe_cloze_acc"] <= 1 for model in MODELS)
    assert "## lm-evaluation-harness" in report and "baseline: chance | 0.25" in report
    # GRPO's over-optimisation curve: steps 0, 1 and 2 (curve_interval 1), and its plot.
    for key in ("gold_score", "reward_model_score", "kl_to_reference", "gold_score_se"):
        curve = (repo / f"dvclive/grpo/plots/metrics/heldout/{key}.tsv").read_text()
        assert [line.split("\t")[0] for line in curve.splitlines()[1:]] == ["0", "1", "2"]
    assert (repo / "data/report/overoptimisation_grpo.png").exists()
    assert "Over-optimisation curve: 3 points" in report
    # REINFORCE beside GRPO at the same budget, and the checkable task's branch.
    grpo, reinforce = (
        json.loads((repo / f"metrics/{s}.json").read_text()) for s in ("grpo", "reinforce")
    )
    assert reinforce["completions_sampled"] == grpo["completions_sampled"] == 2 * 2 * 4
    # One "before", measured once by rl_baseline and read by both.
    baseline = json.loads((repo / "metrics/rl_baseline.json").read_text())
    assert {key: grpo[f"before_{key}"] for key in baseline} == baseline
    assert {key: reinforce[f"before_{key}"] for key in baseline} == baseline
    assert "### REINFORCE against GRPO" in report
    # Paired gains with their intervals, from the per-prompt results kept beside the metrics.
    for m in (grpo, reinforce):
        assert m["gold_gain_lo"] <= m["gold_gain"] <= m["gold_gain_hi"]
        assert m["after_gold_score_se"] >= 0
    items = json.loads((repo / "metrics/items/grpo.json").read_text())
    assert len(items) == grpo["heldout_items"] > 1
    assert {"prompt", "before_gold_score", "after_gold_score"} <= set(items[0])
    task = json.loads((repo / "metrics/task_sft.json").read_text())
    assert task["test_problems"] == 16 and 0 <= task["exact_match"] <= 1
    for stage in ("task_reinforce", "task_grpo"):
        rl = json.loads((repo / f"metrics/{stage}.json").read_text())
        assert rl["before_exact_match"] == task["exact_match"]
        assert rl["completions_sampled"] == 2 * 2 * 2 and "after_pass_at_2" in rl
        assert rl["exact_match_gain_lo"] <= rl["exact_match_gain"] <= rl["exact_match_gain_hi"]
        assert len(json.loads((repo / f"metrics/items/{stage}.json").read_text())) == 16
    assert "### the checkable task: add, 2 digits" in report
    assert not (repo / "data/pretrain/checkpoint/checkpoint.pt").exists()

    # A second repro (here in a copy of the repository) does nothing.
    second = run(["dvc", "repro"], repo).stdout
    assert not ran(second) and "up to date" in second

    # An experiment on lora reruns lora and what depends on it, nothing upstream.
    exp = run(["dvc", "exp", "run", "-S", "lora.r=4"], repo).stdout
    assert ran(exp) == {"lora", "quantize", "gguf", "evaluate", "report"}
    assert {"16", "4"} <= {row["lora.r"] for row in exp_rows(repo)}
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], repo).stdout)
    assert diff["metrics/lora.json"]["trainable_parameters"]["diff"] < 0
    markdown = run(["python", "-m", "llmpipe.compare", "HEAD"], repo).stdout
    assert "### Metrics" in markdown and "trainable_parameters" in markdown
    # lora reran nothing with per-item results: every headline row is an exact rerun.
    assert "### Headline figures" in markdown and "| better |" not in markdown
    assert "lora.r" in markdown  # the params diff

    # Noise bars: two seeds of a variant queued from reinforce on (reinforce, evaluate, report),
    # run one at a time, aggregated.
    variant = "reinforce.learning_rate=2.0e-05"
    command = ["python", "-m", "llmpipe.seeds", "--seeds", "2", "--from", "reinforce"]
    table = run([*command, "--variant", variant], repo).stdout
    experiments = dict(
        seeds._experiments(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout))
    )
    names = [seeds.experiment_name([variant], seed) for seed in (0, 1)]
    assert [experiments[name]["params"]["params.yaml"]["data"]["seed"] for name in names] == [0, 1]
    title = "reinforce KL per token"
    row = next(line for line in table.splitlines() if line.startswith(f"| {title}"))
    assert "± " in row and "(2 seeds)" in row, table
    values = [seeds.headline_figures(experiments[name])[title] for name in names]
    assert values[0] != values[1]
    assert row.split("|")[2].strip().startswith(f"{sum(values) / 2:.4g} ± ")
    # ...and read again without running anything.
    again = run([*command, "--variant", variant, "--report"], repo).stdout
    assert again == table and table.startswith("| figure |")


def test_failing_stage_reports_one_line(project_copy):
    set_params(project_copy, {**MICRO_PARAMS, "download.finetune.source": "file:/nonexistent.txt"})
    result = run(["dvc", "repro", "download"], project_copy, check=False)
    assert result.returncode != 0
    assert "error: file:/nonexistent.txt: file not found" in result.stderr


def test_a_failed_stage_says_how_to_get_its_outputs_back(project_copy):
    """dvc repro deletes a stage's outputs before running it; after a bad param, following the
    error's way back restores them exactly."""
    import hashlib
    import re

    repo = project_copy
    set_params(repo, MICRO_PARAMS)
    run(["dvc", "repro", "tokenize"], repo)
    git_commit_all(repo, "tokenized")
    outputs = [
        "data/tokens/pretrain/train.bin",
        "data/tokens/finetune/meta.json",
        "data/tokenizer/tokenizer.json",
        "metrics/tokenize.json",
    ]
    digest = {path: hashlib.sha256((repo / path).read_bytes()).hexdigest() for path in outputs}

    set_params(repo, {"tokenize.vocab_size": -5})
    result = run(["dvc", "repro", "tokenize"], repo, check=False)
    assert result.returncode != 0
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert line.startswith(
        "error: tokenize.vocab_size: -5 is not a positive integer (dvc repro "
        "removed this stage's previous outputs; to get them back: "
    )
    assert not any((repo / path).exists() for path in outputs)

    way_back = re.search(r"to get them back: (.*)\)$", line).group(1)
    assert way_back == "dvc checkout tokenize && git checkout -- metrics/tokenize.json"
    run(["bash", "-c", way_back], repo)
    assert {
        path: hashlib.sha256((repo / path).read_bytes()).hexdigest() for path in outputs
    } == digest
