"""What a pull request changes, in markdown: the headline figures with their paired intervals,
labelled better, worse or within noise; the params diff, metrics diff and (optionally) the
plots diff, of the workspace against a revision. The CI comment shows exactly this.

    python -m llmpipe.compare main [--plots-out DIR]
    python -m llmpipe.compare exp-a --change exp-b     # two experiments of `dvc exp show`

A revision is anything git names (a branch, a commit, an experiment's ref) or the name of a DVC
experiment. Where `python -m llmpipe.seeds` has run the baseline under several seeds (its
experiments `seeds-baseline-s<k>`), each interval is widened by the seed-to-seed spread of that
figure: a change is then judged against the noise of training too, not only of the items.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace

from llmpipe import layout
from llmpipe.evaluation.intervals import (
    WITHIN_NOISE,
    Estimate,
    estimate,
    holm_rejections,
    item_id,
    paired_difference,
    two_sided_p,
)
from llmpipe.seeds import is_baseline_seed

# The figures a change is judged by, where their stage keeps per-item results (layout.items_file):
# (stage, per-item column of the stage's model, label, +1 where higher is better, -1 where lower
# is). Only these rows are labelled, and the labels are corrected for their number (Holm), so
# that one lucky figure among many is not called a finding.
HEADLINE_ITEMS = (
    ("pretrain", "loss", "pretrain val loss (nats/token)", -1),
    ("finetune", "after_loss", "finetune val loss (nats/token)", -1),
    ("lora", "after_loss", "lora val loss (nats/token)", -1),
    ("quantize", "after_loss", "int8 val loss (nats/token)", -1),
    ("grpo", "after_gold_score", "grpo gold score (held-out)", +1),
    ("reinforce", "after_gold_score", "reinforce gold score (held-out)", +1),
    ("task_sft", "after_exact_match", "task SFT exact match", +1),
    ("task_reinforce", "after_exact_match", "task REINFORCE exact match", +1),
    ("task_grpo", "after_exact_match", "task GRPO exact match", +1),
    ("task_reinforce", "after_pass_at_1", "task REINFORCE pass@1", +1),
    ("task_grpo", "after_pass_at_1", "task GRPO pass@1", +1),
)
ALPHA = 0.05


@dataclass(frozen=True)
class Row:
    label: str
    better: int  # +1: higher is better; -1: lower is
    base: float
    change: float
    difference: Estimate
    paired: bool
    seeds_widened: bool = False  # the interval includes the training seeds' spread
    verdict: str = ""


def _dvc(*args: str) -> str:
    # The dvc of this environment, whether or not its bin directory is on PATH.
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def _git_file(rev: str, path) -> str | None:
    result = subprocess.run(
        ["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True
    )
    return result.stdout if result.returncode == 0 else None


def _items(text: str | None) -> dict[str, dict] | None:
    return None if text is None else {item_id(row): row for row in json.loads(text)}


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def experiment_refs(baseline: str | None = None) -> dict[str, list[str]]:
    """{experiment name: its git refs} of the DVC experiments in this repository, of every
    baseline or of one commit's (DVC keeps each as refs/exps/<commit[:2]>/<commit[2:]>/<name>;
    a name may recur over baselines)."""
    prefix = "refs/exps"
    if baseline is not None:
        commit = _git("rev-parse", "--verify", "--quiet", f"{baseline}^{{commit}}") or ""
        prefix = f"refs/exps/{commit[:2]}/{commit[2:]}"
    listing = _git("for-each-ref", "--format=%(refname)", prefix) or ""
    refs: dict[str, list[str]] = {}
    for ref in listing.splitlines():
        if ref.count("/") >= 4:
            refs.setdefault(ref.rsplit("/", 1)[1], []).append(ref)
    return refs


def resolve(rev: str) -> str:
    """A git revision as given, or the ref of the DVC experiment of that name."""
    if _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}") is not None:
        return rev
    refs = experiment_refs().get(rev, [])
    if len(refs) > 1:
        raise SystemExit(
            f"error: {rev!r} names experiments of {len(refs)} baselines ({', '.join(refs)}): "
            "give one of these refs"
        )
    if not refs:
        raise SystemExit(f"error: {rev!r} is neither a git revision nor a DVC experiment's name")
    return refs[0]


def seed_spread(baseline: str, read=_git_file) -> tuple[dict[tuple[str, str], float], int]:
    """({(stage, column): the standard deviation of the figure over the seeds}, seeds) from
    llmpipe.seeds's experiments without a variant on `baseline`'s commit, ({}, 0) where fewer
    than two have run. A figure the same under every seed (a stage before `--from`, which did
    not rerun) has no spread and is left out."""
    refs = [
        ref
        for name, found in experiment_refs(baseline).items()
        if is_baseline_seed(name)
        for ref in found
    ]
    means: dict[tuple[str, str], list[float]] = {}
    for ref in refs:
        for stage, column, *_ in HEADLINE_ITEMS:
            items = _items(read(ref, layout.items_file(stage)))
            if items and column in next(iter(items.values())):
                values = [row[column] for row in items.values()]
                means.setdefault((stage, column), []).append(sum(values) / len(values))
    spread = {
        key: sd for key, v in means.items() if len(v) >= 2 and (sd := statistics.stdev(v)) > 0
    }
    return spread, len(refs) if spread else 0


def headline_rows(
    base: dict[str, dict[str, dict]],
    change: dict[str, dict[str, dict]],
    spread: dict[tuple[str, str], float] | None = None,
) -> list[Row]:
    """{stage: {prompt: per-item row}} of two revisions -> one labelled row per headline
    figure both have: paired over the items when they are the same prompts, else the
    difference of two independent means. With `spread` ({(stage, column): standard deviation
    over training seeds}), each revision is one draw of its training: the difference's variance
    gains twice the seeds' variance. Holm's correction over the rows."""
    rows = []
    for stage, column, label, better in HEADLINE_ITEMS:
        a, b = base.get(stage), change.get(stage)
        if not a or not b or column not in next(iter(a.values())):
            continue
        ea, eb = (estimate([r[column] for r in items.values()]) for items in (a, b))
        paired = a.keys() == b.keys()
        if paired:
            keys = sorted(a)
            d = paired_difference([a[k][column] for k in keys], [b[k][column] for k in keys])
        else:
            d = Estimate(eb.mean - ea.mean, (ea.se**2 + eb.se**2) ** 0.5, min(ea.n, eb.n))
        seeds_sd = (spread or {}).get((stage, column))
        if seeds_sd is not None:
            d = replace(d, se=(d.se**2 + 2 * seeds_sd**2) ** 0.5)
        rows.append(Row(label, better, ea.mean, eb.mean, d, paired, seeds_sd is not None))
    significant = holm_rejections([two_sided_p(r.difference) for r in rows], ALPHA)
    return [
        replace(
            r,
            verdict=("better" if r.difference.mean * r.better > 0 else "worse")
            if sig
            else WITHIN_NOISE,
        )
        for r, sig in zip(rows, significant, strict=True)
    ]


def _workspace_file(path) -> str | None:
    return path.read_text() if path.exists() else None


def headline_table(
    rev: str, change_rev: str | None = None, names: tuple[str, str] | None = None
) -> str:
    """The headline rows of `change_rev` (None: the workspace) against `rev`, the columns
    titled `names` (default: the revisions)."""
    stages = {stage for stage, *_ in HEADLINE_ITEMS}
    read_change = _workspace_file if change_rev is None else (lambda p: _git_file(change_rev, p))
    base = {s: i for s in stages if (i := _items(_git_file(rev, layout.items_file(s))))}
    change = {s: i for s in stages if (i := _items(read_change(layout.items_file(s))))}
    spread, seeds = seed_spread(rev)
    rows = headline_rows(base, change, spread)
    if not rows:
        return "No headline figure with per-item results in both."
    base_name, change_name = names or (rev, change_rev or "this change")
    lines = [
        f"| figure | {base_name} | {change_name} | difference [95%] | pairing | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.label} | {r.base:.4f} | {r.change:.4f} | {r.difference.text(4)} | "
        f"{'paired' if r.paired else 'unpaired'} ({r.difference.n} items)"
        f"{' + seeds' if r.seeds_widened else ''} | {r.verdict} |"
        for r in rows
    ]
    return "\n".join(lines) + (
        f"\n\n*better*/*worse*: the difference is nonzero at the {ALPHA:.0%} level after "
        f"Holm's correction over these {len(rows)} rows; paired over the same items where "
        "both revisions measured the same ones"
        + (
            f"; *+ seeds*: widened by the figure's spread over {seeds} training seeds of "
            f"{base_name} (llmpipe.seeds; conservative: a seed also redraws the data split, "
            "so the spread holds some of the items' noise too)."
            if seeds
            else "; the training seeds' spread is not included (`python -m llmpipe.seeds` on "
            f"{base_name} adds it)."
        )
    )


def comparison(rev: str, plots_out: str | None = None, change_rev: str | None = None) -> str:
    """The markdown comparison of `change_rev` (None: the workspace) against `rev`; either may
    name a DVC experiment."""
    rev_name, change_name = rev, change_rev or "this change"
    rev = resolve(rev)
    revs = [rev] if change_rev is None else [rev, resolve(change_rev)]
    lines = [
        f"## llmpipe: {change_name} against `{rev_name}`",
        "",
        "### Headline figures",
        "",
        headline_table(*revs, names=(rev_name, change_name)),
        "",
        "### Params",
        "",
        _dvc("params", "diff", *revs, "--md") or "No params changed.",
        "",
        "### Metrics",
        "",
        _dvc("metrics", "diff", *revs, "--md", "--precision", "4") or "No metric changed.",
        "",
    ]
    if plots_out:
        _dvc("plots", "diff", *revs, "--out", plots_out)
        lines += [
            "### Plots",
            "",
            f"Every plot, {rev_name} against {change_name}: `{plots_out}/index.html`.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("rev", nargs="?", default="main", help="revision to compare against")
    parser.add_argument(
        "--change", help="the revision or experiment compared (default: the workspace)"
    )
    parser.add_argument("--plots-out", help="also render the plots diff (HTML) into this folder")
    args = parser.parse_args(argv)
    print(comparison(args.rev, args.plots_out, args.change))


if __name__ == "__main__":
    main()
