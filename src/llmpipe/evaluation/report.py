"""The report card: one markdown page, with its images, that a person reads after `dvc repro`.

It gathers what every stage measured (metrics/*.json), the comparison of every model made by
the evaluate stage, the training curves (dvclive's TSV files) and sample generations, with the
baselines each figure should be read against.

Its images are drawn the way `dvc plots show` draws its plots: DVC's own Vega-Lite templates
(`linear` for the curves, `bar_horizontal` for the models' bars) filled through dvc_render, DVC's
renderer library, and rendered to PNG offline by vl-convert (vl-convert-python).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import platform
from importlib import metadata
from pathlib import Path

from dvc_render.vega import OPTIONAL_ANCHOR_RANGES, VegaRenderer

from llmpipe import layout
from llmpipe.evaluation.intervals import (
    WITHIN_NOISE,
    Z_95,
    interval_metrics,
    paired_difference,
)
from llmpipe.params import PARAMS_FILE, read_params_file

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "tokenizers", "dvc", "dvclive")

# (stage, curve files under layout.curves_dir(stage), title)
CURVES = (
    ("pretrain", ("train/loss.tsv", "val/loss.tsv"), "pretrain: loss"),
    ("finetune", ("train/loss.tsv", "eval/loss.tsv"), "finetune: loss"),
    ("lora", ("train/loss.tsv", "eval/loss.tsv"), "lora: loss"),
    ("reward_model", ("train/loss.tsv", "eval/loss.tsv"), "reward model: loss"),
    ("grpo", ("train/reward.tsv", "train/kl.tsv"), "grpo: reward and KL"),
    ("reinforce", ("train/reward.tsv", "train/kl.tsv"), "reinforce: reward and KL"),
    ("task_sft", ("train/loss.tsv",), "task SFT: loss"),
    (
        "task_reinforce",
        ("train/reward.tsv", "train/entropy.tsv", "train/frac_reward_zero_std.tsv"),
        "task REINFORCE: exact-match reward, entropy and the share of groups without a gradient",
    ),
    (
        "task_grpo",
        ("train/reward.tsv", "train/entropy.tsv", "train/frac_reward_zero_std.tsv"),
        "task GRPO: exact-match reward, entropy and the share of groups without a gradient",
    ),
)


def read_metrics(stage: str) -> dict:
    path = layout.metrics_file(stage)
    return json.loads(path.read_text()) if path.exists() else {}


def environment() -> list[tuple[str, str]]:
    import torch

    rows = [
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        (
            "device",
            torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"CPU, {torch.get_num_threads()} threads",
        ),
    ]
    for name in PACKAGES:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return rows


# (title, dotted key) of the params that shape each model, for the report's params digest.
KEY_PARAMS = (
    ("seed", "seed"),
    ("pretrain corpus", "download.pretrain.source"),
    ("finetune corpus", "download.finetune.source"),
    ("tokenizer", "tokenize.tokenizer"),
    ("vocabulary (bpe)", "tokenize.vocab_size"),
    ("layers", "pretrain.model.n_layer"),
    ("width", "pretrain.model.n_embd"),
    ("context", "pretrain.model.block_size"),
    ("pretrain steps", "pretrain.max_steps"),
    ("finetune steps", "finetune.max_steps"),
    ("lora r / alpha", ("lora.r", "lora.alpha")),
    ("quantization", "quantize.method"),
    ("gold scorer", "preferences.gold_scorer"),
    ("grpo k / beta", ("grpo.num_generations", "grpo.beta")),
    ("grpo steps", "grpo.max_steps"),
)


def params_digest(path: Path = PARAMS_FILE) -> list[tuple[str, str]]:
    """The sha256 of params.yaml (a run with the same digest used the same params) and the
    values that shape the models."""
    from llmpipe.params import flatten

    values = dict(flatten(read_params_file(path)))
    rows = [("params.yaml sha256", hashlib.sha256(path.read_bytes()).hexdigest()[:16])]
    for title, keys in KEY_PARAMS:
        keys = keys if isinstance(keys, tuple) else (keys,)
        rows.append((title, " / ".join(str(values.get(k)) for k in keys)))
    return rows


def _read_curve(path: Path) -> tuple[list[float], list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    value = [k for k in rows[0] if k not in ("step", "timestamp")][0] if rows else ""
    return [float(r["step"]) for r in rows], [float(r[value]) for r in rows]


# `dvc plots show` colours a plot's lines by revision and tells its files apart by dash: the
# report card shows one revision, the workspace, so every image has DVC's first colour.
REVISION = "workspace"
# vl-convert's pixels per Vega-Lite pixel: DVC's templates draw a 300 x 300 plot, which with its
# axes and legend makes an image about 430 pixels wide.
PNG_SCALE = 1


def vega_spec(
    points: list[dict],
    template: str,
    title: str,
    axes: tuple[str, str],
    labels: tuple[str, str],
    sources: tuple[str, ...] = (),
) -> dict:
    """A Vega-Lite spec: one of DVC's stock templates filled by dvc_render the way `dvc plots
    show` fills it, with `axes` the (x, y) fields of the points. `sources` names the curves of
    a plot that has several (each point's "filename"), which the templates draw with a dash
    and a legend entry each. Empty where there are no points."""
    x, y = axes
    renderer = VegaRenderer(
        [{**point, "rev": REVISION} for point in points],
        title,
        template=template,
        title=title,
        x=x,
        y=y,
        x_label=labels[0],
        y_label=labels[1],
        anchors_y_definitions=[{"filename": source, "field": y} for source in sources],
    )
    return renderer.get_filled_template()


def render_png(spec: dict, out_dir: Path, name: str) -> str:
    """Writes the spec as out_dir/name, a PNG; returns the name. Offline: the data is inline in
    the spec and no URL may be loaded."""
    import vl_convert  # not in the GPU smoke kit: images() checks for it first

    png = vl_convert.vegalite_to_png(spec, scale=PNG_SCALE, allowed_base_urls=[])
    (out_dir / name).write_bytes(png)
    return name


def curve_spec(stage: str, files: tuple[str, ...], title: str) -> dict:
    """A stage's training curves (dvclive's TSV files that exist) in DVC's default template,
    `linear`; empty when the stage wrote none."""
    paths = {Path(f).with_suffix("").as_posix(): layout.curves_dir(stage) / f for f in files}
    paths = {name: path for name, path in paths.items() if path.exists()}
    points = [
        {"step": step, "value": value, "filename": name}
        for name, path in paths.items()
        for step, value in zip(*_read_curve(path), strict=True)
    ]
    # dvclive names a file's value column after the file: "loss", or "reward / kl"
    y_label = " / ".join(dict.fromkeys(Path(name).name for name in paths))
    return vega_spec(points, "linear", title, ("step", "value"), ("step", y_label), tuple(paths))


def plot_curves(out_dir: Path) -> list[tuple[str, str]]:
    """PNG files of the training curves that exist; returns (title, file name)."""
    return [
        (title, render_png(spec, out_dir, f"curve_{stage}.png"))
        for stage, files, title in CURVES
        if (spec := curve_spec(stage, files, title))
    ]


def overoptimisation(stage: str) -> dict | None:
    """An RL stage's over-optimisation curve (llmpipe.rl.harness.HeldoutCurve), when it has one:
    steps, KL, the gold and reward-model scores, and the gold score's standard error at each
    point where it was logged."""
    paths = {
        key: layout.curves_dir(stage) / "heldout" / f"{key}.tsv" for key in layout.HELDOUT_CURVES
    }
    if not all(path.exists() for path in paths.values()):
        return None
    curve = {key: _read_curve(path) for key, path in paths.items()}
    se_path = layout.curves_dir(stage) / "heldout" / "gold_score_se.tsv"
    return {
        "steps": curve["gold_score"][0],
        "kl": curve["kl_to_reference"][1],
        "gold": curve["gold_score"][1],
        "gold_se": _read_curve(se_path)[1] if se_path.exists() else None,
        "proxy": curve["reward_model_score"][1],
    }


GAIN_AXES = ("KL to the reference (nats per completion)", "gain since step 0")


def _gains(c: dict, key: str, name: str) -> list[dict]:
    return [
        {"kl": kl, "gain": value - c[key][0], "filename": name}
        for kl, value in zip(c["kl"], c[key], strict=True)
    ]


def overoptimisation_spec(stage: str, c: dict) -> dict:
    """Gold and reward-model gains since step 0 against KL to the reference, in the `linear`
    template, under them the gold gain's 95% band where its standard errors were logged."""
    gold, proxy = _gains(c, "gold", "gold score"), _gains(c, "proxy", "reward-model score")
    band = c["gold_se"] is not None
    if band:  # each point's own interval, not paired with step 0 (the table has the paired one)
        for point, se in zip(gold, c["gold_se"], strict=True):
            point["lo"], point["hi"] = point["gain"] - Z_95 * se, point["gain"] + Z_95 * se
    spec = vega_spec(
        gold + proxy,
        "linear",
        f"{stage}: gains against KL, gold with its 95% band",
        ("kl", "gain"),
        GAIN_AXES,
        ("gold score", "reward-model score"),
    )
    if band and spec:
        spec["layer"].insert(0, _band_layer())  # first: drawn under the lines
    return spec


def _band_layer() -> dict:
    """No stock template draws a band, so the over-optimisation spec adds this layer: an area
    between each gold point's "lo" and "hi" (the rows that have them). It takes the plot's colour
    as a value: the colour field's legend would otherwise take the area's faint fill."""
    colour = OPTIONAL_ANCHOR_RANGES["color"][0]  # what dvc_render gives the one revision
    return {
        "transform": [{"filter": "isValid(datum.lo)"}],
        "mark": {"type": "area", "opacity": 0.2},
        "encoding": {
            "y": {"field": "lo", "type": "quantitative", "title": GAIN_AXES[1]},
            "y2": {"field": "hi"},
            "color": {"value": colour},
        },
    }


def plot_overoptimisation(out_dir: Path) -> list[tuple[str, str]]:
    """Gold and proxy gains against KL to the reference, one plot per RL stage."""
    images = []
    for stage in layout.STAGES:
        c = overoptimisation(stage)
        if c is not None and (spec := overoptimisation_spec(stage, c)):
            name = render_png(spec, out_dir, f"overoptimisation_{stage}.png")
            images.append((f"{stage}: gold and proxy against KL", name))
    return images


# (metrics/evaluate_models.json's field, title): two of dvc.yaml's top-level bar plots
MODEL_BARS = (
    ("val_perplexity_finetune", "validation perplexity, finetune corpus"),
    ("gold_score", "gold score of held-out completions"),
)


def model_spec(rows: list[dict], key: str, title: str) -> dict:
    """One figure of every model in `bar_horizontal`, as dvc.yaml's top-level plots draw it (x:
    the figure, y: the model); a model without the figure has no bar."""
    points = [{"model": r["model"], key: r[key]} for r in rows if r.get(key) is not None]
    return vega_spec(points, "bar_horizontal", title, (key, "model"), (key, "model"))


def plot_models(rows: list[dict], out_dir: Path) -> list[tuple[str, str]]:
    return [
        (title, render_png(spec, out_dir, f"models_{key}.png"))
        for key, title in MODEL_BARS
        if (spec := model_spec(rows, key, title))
    ]


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def gain_text(m: dict, name: str) -> str:
    """A gain (or change) with its paired 95% interval and what it supports: "+0.137
    [+0.091, +0.183], up", or "within noise" where the interval covers 0."""
    value, lo, hi = m[name], m.get(f"{name}_lo"), m.get(f"{name}_hi")
    if lo is None or hi is None:
        return f"{value:+.3g} (no interval)"
    verdict = "up" if lo > 0 else "down" if hi < 0 else WITHIN_NOISE
    return f"{value:+.3f} [{lo:+.3f}, {hi:+.3f}], {verdict}"


def interval_text(m: dict, name: str) -> str:
    """A level with its 95% interval: "12.3 [11.9, 12.8]"."""
    if f"{name}_lo" not in m:
        return _format(m[name])
    return f"{_format(m[name])} [{_format(m[name + '_lo'])}, {_format(m[name + '_hi'])}]"


def _table(header: list[str], rows: list[list]) -> str:
    fmt = _format
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_sections() -> list[str]:
    """One table per stage that ran, each figure beside its baseline."""
    sections = []
    if m := read_metrics("tokenize"):
        sections.append(
            "### tokenize\n"
            + _table(
                [
                    "vocabulary",
                    "pretrain train/val tokens",
                    "finetune train/val tokens",
                    "bytes per token",
                ],
                [
                    [
                        m["vocab_size"],
                        f"{m['pretrain_train_tokens']:,} / {m['pretrain_val_tokens']:,}",
                        f"{m['finetune_train_tokens']:,} / {m['finetune_val_tokens']:,}",
                        m["pretrain_bytes_per_token"],
                    ]
                ],
            )
        )
    if m := read_metrics("pretrain"):
        sections.append(
            "### pretrain\n"
            + _table(
                [
                    "parameters",
                    "tokens seen",
                    "val perplexity [95%]",
                    "baseline: unigram perplexity",
                    "tokens/s",
                    "MFU",
                ],
                [
                    [
                        m["parameters"],
                        m["tokens_seen"],
                        interval_text(m, "val_perplexity"),
                        m["unigram_val_perplexity"],
                        m["perf"]["tokens_per_s"],
                        m["perf"]["mfu"],
                    ]
                ],
            )
        )
    rows = [
        [
            stage,
            m["base_val_perplexity"],
            interval_text(m, "val_perplexity"),
            gain_text(m, "val_loss_change"),
            m.get("trainable_percent", 100.0),
            m["best_step"],
            m["steps"],
        ]
        for stage in ("finetune", "lora")
        if (m := read_metrics(stage))
    ]
    if rows:
        sections.append(
            "### finetune and lora (finetune corpus)\n"
            + _table(
                [
                    "stage",
                    "baseline: base perplexity",
                    "val perplexity [95%]",
                    "val loss change, paired [95%]",
                    "trained %",
                    "best step (on the selection split)",
                    "steps",
                ],
                rows,
            )
        )
    if m := read_metrics("quantize"):
        sections.append(
            "### quantize\n"
            + _table(
                [
                    "method",
                    "MB (fp32 -> int8)",
                    "perplexity (fp32 -> int8)",
                    "val loss change, paired [95%]",
                    "top-1 agreement",
                    "forward speedup",
                    "generation speedup vs fp32 eager",
                ],
                [
                    [
                        m["method"],
                        f"{m['fp32_size_mb']:.2f} -> {m['int8_size_mb']:.2f}",
                        f"{m['fp32_val_perplexity']:.2f} -> {m['int8_val_perplexity']:.2f}",
                        gain_text(m, "val_loss_change"),
                        m["top1_agreement"],
                        m["perf"]["forward_speedup"],
                        ", ".join(
                            f"{k} x{v}"
                            for k, v in m["perf"]["generate_speedup_vs_fp32_eager"].items()
                        ),
                    ]
                ],
            )
        )
    if m := read_metrics("gguf"):
        sections.append(
            "### gguf (llama.cpp files, checked by a NumPy forward against the HF model)\n"
            + _table(
                [
                    "file",
                    "MB",
                    "max \\|logit - HF's\\|",
                    f"same likeliest token ({m['check_tokens']} positions)",
                    "HF top-2 margin where not",
                ],
                [
                    [
                        f"{name}.gguf",
                        f"{row['size_mb']:.2f}",
                        f"{row['max_abs_logit_diff']:.4f}",
                        f"{row['greedy_agreement']:.0%}",
                        "-"
                        if row["hf_top2_margin_where_not"] is None
                        else f"{row['hf_top2_margin_where_not']:.4f}",
                    ]
                    for name, row in m["files"].items()
                ],
            )
        )
    if (m := read_metrics("preferences")) and (r := read_metrics("reward_model")):
        sections.append(
            "### preferences and reward model\n"
            + _table(
                [
                    "train pairs",
                    "held-out pairs",
                    "tie rate",
                    "gold margin, chosen - rejected [95%]",
                    "held-out accuracy [95%]",
                    "baseline: chance",
                    "gold agreement (fresh pairs) [95%]",
                ],
                [
                    [
                        m["train_pairs"],
                        m["heldout_pairs"],
                        m["tie_rate"],
                        interval_text(m, "gold_margin") if "gold_margin" in m else "n/a",
                        interval_text(r, "heldout_accuracy"),
                        r["chance_accuracy"],
                        interval_text(r, "gold_agreement_fresh"),
                    ]
                ],
            )
            + (
                f"\n\nThe gold scorer reads {m['gold_neutral_words']} words of its lexicon as "
                "neutral: the finetune corpus's own vocabulary (`preferences.gold_domain_share`;"
                " the list is in data/preferences/gold.json)."
                if m.get("gold_neutral_words")
                else ""
            )
        )
    for stage in RL_STAGES:
        if m := read_metrics(stage):
            sections.append(rl_section(stage, m))
    if rows := [
        [
            stage,
            m["completions_sampled"],
            gain_text(m, "gold_gain"),
            gain_text(m, "reward_model_gain"),
            *(gain_text(m, g) if g in m else "n/a" for g in ("afinn_gain", "textblob_gain")),
            interval_text(m, "after_kl_per_token"),
            m["distinct_2_change"],
            m["perf"]["wall_s"],
        ]
        for stage in RL_STAGES
        if (m := read_metrics(stage))
    ]:
        sections.append(
            "### REINFORCE against GRPO (same prompts, sampling and budget)\n"
            "Gains are paired over the held-out prompts (the same prompts and sampling seed "
            "before and after), with their 95% interval: *within noise* where it covers 0. "
            "AFINN and TextBlob are held-out judges: sentiment lexicons that no stage "
            "optimises, so a gain they do not share belongs to the proxy and the gold scorer "
            "alone.\n\n"
            + _table(
                [
                    "stage",
                    "completions sampled",
                    "gold gain [95%]",
                    "reward-model gain [95%]",
                    "held-out AFINN gain [95%]",
                    "held-out TextBlob gain [95%]",
                    "KL per token [95%]",
                    "distinct bigrams",
                    "wall s (with the curve)",
                ],
                rows,
            )
        )
    if task := task_section():
        sections.append(task)
    return sections


RL_STAGES = ("grpo", "reinforce")  # RLHF on the preference prompts, judged the same way


def rl_section(stage: str, m: dict) -> str:
    return (
        f"### {stage} (held-out prompts, same sampling seed)\n"
        + _table(
            [
                "",
                "gold score",
                "reward-model score",
                "held-out AFINN",
                "held-out TextBlob",
                "KL to reference",
                "length",
                "distinct bigrams",
                "repeated trigrams",
                "SFT loss (nats/token)",
            ],
            [
                [
                    when,
                    m[f"{when}_gold_score"],
                    m[f"{when}_reward_model_score"],
                    m.get(f"{when}_afinn_score"),
                    m.get(f"{when}_textblob_score"),
                    m[f"{when}_kl_to_reference"],
                    m[f"{when}_completion_length"],
                    m[f"{when}_distinct_2"],
                    m[f"{when}_repeated_3gram_share"],
                    m[f"{when}_reference_loss"],
                ]
                for when in ("before", "after")
            ],
        )
        + (
            "\n\n**Reward hacking suspected**: the reward model's score rose (its interval is "
            "above 0), the gold score did not (its interval reaches 0)."
            if m.get("reward_hacking_suspected")
            else ""
        )
        + (
            "\n\n**Over-optimisation suspected**: the reward model's score rose while no "
            "held-out judge's did, or diversity collapsed."
            if m.get("overoptimisation_suspected")
            else ""
        )
        + (
            f"\n\nWords whose share of completions rose most: {m['rising_words']}."
            if m.get("rising_words")
            else ""
        )
        + (
            f"\n\n**Degeneration suspected**: the gold score rose "
            f"({m['gold_gain']:+.3f}) while distinct bigrams changed by "
            f"{m['distinct_2_change']:+.0%} and the SFT model's loss on the completions by "
            f"{m['reference_loss_change']:+.2f} nats/token: read the samples below."
            if m.get("degeneration_suspected")
            else ""
        )
        + _overoptimisation_text(stage)
    )


TASK_FIGURES = (
    "teacher_forced_token_accuracy",
    "teacher_forced_sequence_accuracy",
    "exact_match",
    "pass_at_1",
)


def task_section() -> str:
    """The checkable task: every model of the branch on the test problems."""
    if not (sft := read_metrics("task_sft")):
        return ""
    k = f"pass_at_{sft['pass_k']}"
    figures = (*TASK_FIGURES, k, "malformed_share")
    rows = [
        ["pretrained (base)", *(sft[f"base_{f}"] for f in figures)],
        ["SFT (teacher forcing)", *(sft[f] for f in figures)],
    ]
    rows += [
        [f"SFT + {stage.removeprefix('task_')}", *(m[f"after_{f}"] for f in figures)]
        for stage in ("task_reinforce", "task_grpo")
        if (m := read_metrics(stage))
    ]
    budget = [
        f"{stage.removeprefix('task_')}: {m['completions_sampled']:,} completions, "
        f"{m['perf']['wall_s']:.0f} s"
        for stage in ("task_reinforce", "task_grpo")
        if (m := read_metrics(stage))
    ]
    gains = [["SFT (from the base model)", gain_text(sft, "exact_match_gain"), ""]]
    gains += [
        [
            f"{stage.removeprefix('task_')} (from SFT)",
            gain_text(m, "exact_match_gain"),
            gain_text(m, "pass_at_1_gain"),
        ]
        for stage in ("task_reinforce", "task_grpo")
        if (m := read_metrics(stage)) and "exact_match_gain_lo" in m
    ]
    gains += algorithm_difference()
    what = sft["kind"] if sft["kind"] == "gsm8k" else f"{sft['kind']}, {sft['digits']} digits"
    return (
        f"### the checkable task: {what} "
        f"({sft['test_problems']} test problems, disjoint from {sft['train_problems']} "
        "train problems)\n"
        + _table(
            [
                "model",
                "teacher-forced token accuracy",
                "teacher-forced whole answers",
                "free-running exact match (greedy)",
                "pass@1 (sampled)",
                f"pass@{sft['pass_k']} (from {sft['pass_samples']} samples)",
                "malformed",
            ],
            rows,
        )
        + "\n\nBaseline: "
        + (
            f"chance exact match {sft['chance_exact_match']:.4f}"
            if sft["chance_exact_match"] is not None
            else "the base model's row (no chance level: any number is an answer)"
        )
        + ". Teacher-forced token accuracy counts single tokens after the true prefix and "
        "exact match whole answers, so the two are different units and their difference is "
        "not exposure bias; whole answers right under teacher forcing equal greedy exact "
        "match by construction (greedy decoding follows the top prediction). RL: "
        + "; ".join(budget)
        + ".\n\nGains, paired over the same test problems (and sampling seeds), with their "
        "95% interval over the problems. Each is one training run: the interval leaves out the "
        "run's own noise, which other training seeds show (`python -m llmpipe.seeds --from "
        "task_reinforce`, or `--from task_grpo`):\n\n"
        + _table(["step", "exact match (greedy)", "pass@1 (sampled)"], gains)
        + "\n\n"
        + control_text()
    )


CONTROL_KEYS = ("prompt", "before_pass_at_1", "before_exact_match")  # what makes a record current
CONTROL_GAINS = ("pass_at_1_gain", "exact_match_gain")


def measured_alike(first: list[dict], second: list[dict]) -> bool:
    """Two runs' per-problem results pair: the same problems, the same results before RL (the
    same SFT model, measured with the same sampling seeds)."""
    return [[i[k] for k in CONTROL_KEYS] for i in first] == [
        [i[k] for k in CONTROL_KEYS] for i in second
    ]


def difference_after_rl(first: list[dict], second: list[dict]) -> dict[str, float]:
    """second's results after RL minus first's, problem by problem, as gains with intervals."""
    difference = {}
    for gain in CONTROL_GAINS:
        figure = f"after_{gain.removesuffix('_gain')}"
        difference |= interval_metrics(
            gain, paired_difference([i[figure] for i in first], [i[figure] for i in second])
        )
    return difference


def algorithm_difference() -> list[list[str]]:
    """GRPO's results after RL minus REINFORCE's, problem by problem (a row of the gains
    table): both start from the same SFT model and measure with the same sampling seeds, and
    the pair's budgets and schedules match, so the difference is the algorithm's. None where
    either did not run with the checker's reward or they measured other problems."""
    items = {}
    for stage in ("task_reinforce", "task_grpo"):
        path = layout.items_file(stage)
        if read_metrics(stage).get("reward") != "checker" or not path.exists():
            return []
        items[stage] = json.loads(path.read_text())
    reinforce, grpo = items["task_reinforce"], items["task_grpo"]
    if not measured_alike(reinforce, grpo):
        return []
    difference = difference_after_rl(reinforce, grpo)
    return [
        [
            "grpo over reinforce (the algorithms, on equal budgets)",
            gain_text(difference, "exact_match_gain"),
            gain_text(difference, "pass_at_1_gain"),
        ]
    ]


def control_text() -> str:
    """The random-reward control (llmpipe.control) beside the checker's gains, and the two
    paired problem by problem: same SFT model, same sampling seeds, so the difference is the
    reward's. A record measured from another SFT model is named stale and not paired."""
    control = json.loads(layout.TASK_CONTROL.read_text()) if layout.TASK_CONTROL.exists() else {}
    if not control.get("stages"):
        return (
            "No random-reward control is recorded: `python -m llmpipe.control` runs it "
            "(a DVC experiment) and records it for this table."
        )
    rows, stale = [], []
    for stage, c in control["stages"].items():
        m, items_path = read_metrics(stage), layout.items_file(stage)
        if m.get("reward") != "checker" or not items_path.exists():
            continue  # not run, or this run is a control itself
        name = stage.removeprefix("task_")
        items = json.loads(items_path.read_text())
        if not measured_alike(items, c["items"]):
            stale.append(name)
            continue
        # the checker's results after RL minus the control's, problem by problem
        over = difference_after_rl(c["items"], items)
        rows += [
            [f"{name}: checker reward", *(gain_text(m, g) for g in CONTROL_GAINS)],
            [
                f"{name}: random reward, p = {c['random_reward_probability']:.3f} (control)",
                *(gain_text(c, g) for g in CONTROL_GAINS),
            ],
            [f"{name}: checker over control", *(gain_text(over, g) for g in CONTROL_GAINS)],
        ]
    text = (
        f"The random-reward control (Shao et al. 2025; experiment `{control['experiment']}`): "
        "the same RL with a reward drawn at the SFT model's sampled pass rate, whatever the "
        "answer, the same prompts and steps. What the checker adds over it is the reward's: a "
        "gain under the control is not the answers being right, and a loss under it is what "
        "the updates alone do to the model."
    )
    if rows:
        text += "\n\n" + _table(["run", "pass@1 gain (sampled)", "exact match gain (greedy)"], rows)
    if stale:
        text += (
            f"\n\nStale for {', '.join(stale)}: the control was measured from another SFT model "
            "(its results before RL differ from this run's); `python -m llmpipe.control "
            "--rerun` measures it again."
        )
    return text


def _overoptimisation_text(stage: str) -> str:
    """What the curve is, without reading a peak into a few noisy points: the end-of-run
    gains above carry the intervals."""
    if (c := overoptimisation(stage)) is None:
        return ""
    return (
        f"\n\nOver-optimisation curve: {len(c['steps'])} points on the first held-out prompts "
        "(the plot below, gold with its 95% band). Each point is a small sample; read a trend "
        "from the band, and the end-of-run gain from the paired interval above."
    )


def harness_section(models: list[dict]) -> str:
    """lm-evaluation-harness accuracies per model, beside chance."""
    from llmpipe.evaluation.harness import CHANCE

    tasks = sorted(
        {
            k.removesuffix("_acc")
            for r in models
            for k in r
            if k.endswith("_acc") and f"{k}_stderr" in r
        }
    )
    if not tasks:
        return ""
    return (
        "## lm-evaluation-harness (zero-shot accuracy ± standard error)\n\n"
        + _table(
            ["model", *tasks],
            [["baseline: chance", *(CHANCE.get(t, "") for t in tasks)]]
            + [
                [r["model"], *(f"{r[f'{t}_acc']:.3f} ± {r[f'{t}_acc_stderr']:.3f}" for t in tasks)]
                for r in models
            ],
        )
        + "\n"
    )


NO_PLOTS = (
    "(No images: vl-convert-python, which renders DVC's plot templates to PNG, is not installed "
    "here, as in the GPU smoke kit (scripts/gpu_kit.py); `pip install vl-convert-python` draws "
    "them.)"
)


def images(plot, *args) -> list[str]:
    """Markdown image lines from a plot function, or one note where vl-convert-python is missing
    (the GPU smoke kit leaves out its 33 MB wheel; every full install has it)."""
    if importlib.util.find_spec("vl_convert") is None:
        return [NO_PLOTS]
    return [f"![{title}]({name})" for title, name in plot(*args)]


def write_report(out_dir: Path, models: list[dict], samples: dict[str, list[dict]]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# llmpipe report card",
        "",
        "## Environment",
        "",
        _table(["", ""], [list(r) for r in environment()]),
        "",
        "## Params",
        "",
        _table(["", ""], [list(r) for r in params_digest()]),
        "",
        f"Every figure below comes from one run (seed {read_params_file(PARAMS_FILE)['seed']}"
        "): read a difference between two runs against the noise bars of "
        '`python -m llmpipe.seeds` (docs/sharing-and-experiments.md, "Noise bars").',
        "",
        "## Every model, same data and prompts",
        "",
        _table(
            [
                "model",
                "val ppl (pretrain corpus) [95%]",
                "val ppl (finetune corpus) [95%]",
                "bits per byte (pretrain / finetune)",
                "reward-model score",
                "gold score",
                "gold vs finetune, paired [95%]",
                "KL to finetune",
                "size MB",
                "generation tokens/s",
                "device",
            ],
            [
                [
                    r["model"],
                    interval_text(r, "val_perplexity_pretrain"),
                    interval_text(r, "val_perplexity_finetune"),
                    f"{r['val_bits_per_byte_pretrain']:.4f} / "
                    f"{r['val_bits_per_byte_finetune']:.4f}",
                    r["reward_model_score"],
                    r["gold_score"],
                    gain_text(r, "gold_vs_finetune") if "gold_vs_finetune" in r else "",
                    r["kl_to_finetune"],
                    r["size_mb"],
                    r["generate_tokens_per_s"],
                    r["device"],
                ]
                for r in models
            ],
        ),
        "",
    ]
    lines += images(plot_models, models, out_dir)
    lines += ["", harness_section(models)]
    lines += ["", "## Stages", ""]
    for section in stage_sections():
        lines += [section, ""]
    lines += ["## Training curves", ""]
    lines += images(plot_curves, out_dir)
    lines += images(plot_overoptimisation, out_dir)
    lines += ["", "## Samples", ""]
    for model, rows in samples.items():
        lines += [f"### {model}", ""]
        lines += [f"- **{r['prompt']}**{r['completion']}".replace("\n", " ") for r in rows]
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
