"""What a pull request changes, in markdown: the headline figures with their paired intervals,
labelled better, worse or within noise; the params diff, metrics diff and (optionally) the
plots diff, of the workspace against a revision. The CI comment shows exactly this.

    python -m llmpipe.compare main [--plots-out DIR]
"""

from __future__ import annotations

import argparse
import json
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


def headline_rows(
    base: dict[str, dict[str, dict]], change: dict[str, dict[str, dict]]
) -> list[Row]:
    """{stage: {prompt: per-item row}} of two revisions -> one labelled row per headline
    figure both have: paired over the items when they are the same prompts, else the
    difference of two independent means. Holm's correction over the rows."""
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
        rows.append(Row(label, better, ea.mean, eb.mean, d, paired))
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


def headline_table(rev: str) -> str:
    stages = {stage for stage, *_ in HEADLINE_ITEMS}
    base = {s: i for s in stages if (i := _items(_git_file(rev, layout.items_file(s))))}
    change = {
        s: _items(layout.items_file(s).read_text()) for s in stages if layout.items_file(s).exists()
    }
    rows = headline_rows(base, change)
    if not rows:
        return "No headline figure with per-item results in both."
    lines = [
        f"| figure | {rev} | this change | difference [95%] | pairing | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.label} | {r.base:.4f} | {r.change:.4f} | {r.difference.text(4)} | "
        f"{'paired' if r.paired else 'unpaired'} ({r.difference.n} items) | {r.verdict} |"
        for r in rows
    ]
    return "\n".join(lines) + (
        f"\n\n*better*/*worse*: the difference is nonzero at the {ALPHA:.0%} level after "
        f"Holm's correction over these {len(rows)} rows; paired over the same items where "
        "both revisions measured the same ones."
    )


def comparison(rev: str, plots_out: str | None = None) -> str:
    lines = [
        f"## llmpipe: this change against `{rev}`",
        "",
        "### Headline figures",
        "",
        headline_table(rev),
        "",
        "### Params",
        "",
        _dvc("params", "diff", rev, "--md") or "No params changed.",
        "",
        "### Metrics",
        "",
        _dvc("metrics", "diff", rev, "--md", "--precision", "4") or "No metric changed.",
        "",
    ]
    if plots_out:
        _dvc("plots", "diff", rev, "--out", plots_out)
        lines += [
            "### Plots",
            "",
            f"Every plot, {rev} against this change: `{plots_out}/index.html`.",
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
    parser.add_argument("--plots-out", help="also render the plots diff (HTML) into this folder")
    args = parser.parse_args(argv)
    print(comparison(args.rev, args.plots_out))


if __name__ == "__main__":
    main()
