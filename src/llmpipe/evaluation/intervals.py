"""How sure a figure is: the mean over items with its standard error and 95% interval, and
the paired difference of two measurements of the same items.

An item is the unit that is independent of the others: a held-out prompt (its sampled
completions averaged), a test problem. The interval is the normal approximation to the mean
(mean +- 1.96 standard errors, the standard error from the items' sample standard deviation,
n - 1): the mean of a hundred or more bounded items is close to normal. A difference measured
on the same items with the same sampling seeds is paired: the interval comes from the per-item
differences, which cancels what the items share (an easy prompt is easy before and after).
docs/statistics.md says how to read them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmpipe.errors import DataError
from llmpipe.io import rounded, write_json

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile

WITHIN_NOISE = "within noise"


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` items with its standard error."""

    mean: float
    se: float
    n: int

    @property
    def lo(self) -> float:
        return self.mean - Z_95 * self.se

    @property
    def hi(self) -> float:
        return self.mean + Z_95 * self.se

    def direction(self) -> str:
        """ "up" or "down" where the 95% interval excludes 0, else "within noise"."""
        if self.lo > 0:
            return "up"
        if self.hi < 0:
            return "down"
        return WITHIN_NOISE

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def estimate(values: Sequence[float]) -> Estimate:
    """The mean of per-item values and its standard error (0 for fewer than two items)."""
    n = len(values)
    if n == 0:
        raise ValueError("no items to estimate from")
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(mean, 0.0, n)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def ratio_estimate(numerators: Sequence[float], denominators: Sequence[float]) -> Estimate:
    """sum(numerators) / sum(denominators) over items (e.g. KL per token: each prompt's KL over
    its tokens), with the delta method's standard error: that of the items' residuals
    numerator - ratio x denominator, over the mean denominator."""
    if len(numerators) != len(denominators):
        raise DataError(f"ratio items differ in number: {len(numerators)} and {len(denominators)}")
    n = len(numerators)
    mean_denominator = math.fsum(denominators) / n
    if mean_denominator == 0:
        raise DataError("ratio: the denominators sum to 0")
    ratio = math.fsum(numerators) / math.fsum(denominators)
    residuals = estimate([a - ratio * b for a, b in zip(numerators, denominators, strict=True)])
    return Estimate(ratio, residuals.se / abs(mean_denominator), n)


def paired_difference(before: Sequence[float], after: Sequence[float]) -> Estimate:
    """after - before over the same items, in the same order."""
    if len(before) != len(after):
        raise DataError(f"paired items differ in number: {len(before)} and {len(after)}")
    return estimate([a - b for b, a in zip(before, after, strict=True)])


def interval_metrics(name: str, e: Estimate) -> dict[str, float]:
    """`name`, `name_lo`, `name_hi`: a figure and its 95% interval, as the metrics files
    carry them."""
    return {name: e.mean, f"{name}_lo": e.lo, f"{name}_hi": e.hi}


def two_sided_p(e: Estimate) -> float:
    """The normal two-sided p-value of "the mean is 0" (1 when the standard error is 0 and the
    mean is 0; 0 when it is 0 and the mean is not)."""
    if e.se == 0:
        return 1.0 if e.mean == 0 else 0.0
    return math.erfc(abs(e.mean / e.se) / math.sqrt(2))


def holm_rejections(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which of the hypotheses to reject while the chance of any
    false rejection among them stays at most `alpha`, however they depend on each other."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


# --- a measuring stage's report: scalar figures, and per-item results under "items" -----------


def scalar_figures(report: dict) -> list[str]:
    """The report's figures: its numbers and flags (its samples, items and other tables
    aside)."""
    return [key for key, value in report.items() if isinstance(value, int | float | str)]


def item_values(report: dict, figure: str) -> list[float] | None:
    """The figure's per-item values, or None where the report has none for it (a corpus-level
    figure such as distinct bigrams)."""
    items = report.get("items") or []
    if not items or figure not in items[0]:
        return None
    return [float(item[figure]) for item in items]


def level_metrics(report: dict, prefix: str = "") -> dict:
    """Every figure of the report as `prefix + figure`, with `_se` beside those measured per
    item."""
    metrics = {}
    for figure in scalar_figures(report):
        metrics[f"{prefix}{figure}"] = report[figure]
        if (values := item_values(report, figure)) is not None:
            metrics[f"{prefix}{figure}_se"] = estimate(values).se
    return metrics


def paired_gain(before: dict, after: dict, figure: str) -> Estimate:
    """after - before of a figure, paired over the reports' items, which must be the same
    items in the same order."""
    before_items, after_items = before.get("items") or [], after.get("items") or []
    if [item_id(i) for i in before_items] != [item_id(i) for i in after_items]:
        raise DataError(f"{figure}: the two reports were not measured on the same items")
    values = [item_values(r, figure) for r in (before, after)]
    if values[0] is None or values[1] is None:
        raise DataError(f"{figure}: no per-item values to pair")
    paired = paired_difference(*values)
    # The figure's own difference (a mean over completions), with the paired standard error.
    return Estimate(after[figure] - before[figure], paired.se, paired.n)


def gain_metrics(before: dict, after: dict, gains: dict[str, str]) -> dict:
    """{gain name: after - before, with its paired 95% interval} for {figure: gain name}."""
    metrics = {}
    for figure, name in gains.items():
        metrics.update(interval_metrics(name, paired_gain(before, after, figure)))
    return metrics


ITEM_IDS = ("pair", "prompt", "window")  # what names an item in a per-item row


def item_id(item: dict):
    """An item's name: its pair index (a preference pair), its prompt (a held-out prompt, a
    test problem) or its window index."""
    return next(item[key] for key in ITEM_IDS if key in item)


def write_items(path: Path, before: dict, after: dict | None = None) -> None:
    """The per-item results of a report, or of two reports of the same items: one row per item,
    its name (prompt or window) and every per-item figure (`<figure>`; of two reports,
    `before_<figure>` and `after_<figure>`)."""
    last = after or before
    key = next(k for k in ITEM_IDS if k in last["items"][0])
    figures = [f for f in last["items"][0] if f != key]
    reports = (("before_", before), ("after_", after)) if after is not None else (("", before),)
    columns = {
        f"{name}{figure}": item_values(report, figure)
        for name, report in reports
        for figure in figures
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        path,
        rounded(
            [
                {key: item[key], **{c: values[i] for c, values in columns.items()}}
                for i, item in enumerate(last["items"])
            ]
        ),
    )
