"""The report card's images: DVC's own plot templates filled by dvc_render with the points of
dvclive's TSV files, rendered to PNG offline by vl-convert-python (no torch, no model)."""

import importlib.util

import pytest

from llmpipe import layout
from llmpipe.evaluation import report
from llmpipe.evaluation.intervals import Z_95

PNG = b"\x89PNG\r\n\x1a\n"


def write_tsv(path, column, steps, values):
    """A dvclive curve file: step, then the value in a column named after the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = zip(steps, values, strict=True)
    path.write_text(f"step\t{column}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A repository root of its own: layout's paths are relative to where DVC runs a stage."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_curve_spec_holds_the_points_of_its_tsv_files_and_renders_to_png(workspace):
    curves = layout.curves_dir("finetune")
    write_tsv(curves / "train/loss.tsv", "loss", (10, 20, 30), (5.5, 5.0, 4.75))
    write_tsv(curves / "eval/loss.tsv", "loss", (20,), (5.25,))

    spec = report.curve_spec("finetune", ("train/loss.tsv", "eval/loss.tsv"), "finetune: loss")

    assert spec["title"]["text"] == "finetune: loss"
    assert [(p["filename"], p["step"], p["value"]) for p in spec["data"]["values"]] == [
        ("train/loss", 10.0, 5.5),
        ("train/loss", 20.0, 5.0),
        ("train/loss", 30.0, 4.75),
        ("eval/loss", 20.0, 5.25),
    ]
    # DVC's `linear` template, its two files told apart by dash as `dvc plots show` does
    assert spec["encoding"]["strokeDash"]["scale"]["domain"] == ["eval/loss", "train/loss"]
    assert spec["encoding"]["x"]["title"] == "step"

    out = workspace / "report"
    out.mkdir()
    assert report.plot_curves(out) == [("finetune: loss", "curve_finetune.png")]
    assert (out / "curve_finetune.png").read_bytes().startswith(PNG)


def test_the_overoptimisation_spec_adds_the_gold_band_to_the_stock_template(workspace):
    heldout = layout.curves_dir("grpo") / "heldout"
    steps = (0, 8, 16)
    write_tsv(heldout / "gold_score.tsv", "gold_score", steps, (0.1, 0.3, 0.2))
    write_tsv(heldout / "gold_score_se.tsv", "gold_score_se", steps, (0.05, 0.05, 0.1))
    write_tsv(heldout / "reward_model_score.tsv", "reward_model_score", steps, (1, 2, 4))
    write_tsv(heldout / "kl_to_reference.tsv", "kl_to_reference", steps, (0, 1.5, 3))

    spec = report.overoptimisation_spec("grpo", report.overoptimisation("grpo"))

    gold = [p for p in spec["data"]["values"] if p["filename"] == "gold score"]
    assert [(p["kl"], round(p["gain"], 9)) for p in gold] == [(0, 0), (1.5, 0.2), (3, 0.1)]
    assert gold[2]["lo"] == pytest.approx(0.1 - Z_95 * 0.1)
    assert gold[2]["hi"] == pytest.approx(0.1 + Z_95 * 0.1)
    proxy = [p for p in spec["data"]["values"] if p["filename"] == "reward-model score"]
    assert [p["gain"] for p in proxy] == [0, 1, 3] and "lo" not in proxy[0]
    band = spec["layer"][0]  # under the template's own layers
    assert band["mark"]["type"] == "area" and band["encoding"]["y2"] == {"field": "hi"}

    out = workspace / "report"
    out.mkdir()
    assert report.plot_overoptimisation(out) == [
        ("grpo: gold and proxy against KL", "overoptimisation_grpo.png")
    ]
    assert (out / "overoptimisation_grpo.png").read_bytes().startswith(PNG)


def test_the_model_bars_are_dvcs_bar_template_and_skip_a_missing_figure(tmp_path):
    rows = [
        {"model": "pretrain", "val_perplexity_finetune": 40.0, "gold_score": None},
        {"model": "finetune", "val_perplexity_finetune": 12.5, "gold_score": 0.25},
    ]
    spec = report.model_spec(rows, "gold_score", "gold score")
    assert spec["mark"] == {"type": "bar"} and spec["encoding"]["y"]["field"] == "model"
    assert [(p["model"], p["gold_score"]) for p in spec["data"]["values"]] == [("finetune", 0.25)]

    names = [name for _, name in report.plot_models(rows, tmp_path)]
    assert names == ["models_val_perplexity_finetune.png", "models_gold_score.png"]
    assert all((tmp_path / name).read_bytes().startswith(PNG) for name in names)


def test_without_the_renderer_the_report_has_one_note_and_no_image(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "vl_convert" else find_spec(name, *args),
    )
    rows = [{"model": "finetune", "val_perplexity_finetune": 12.5, "gold_score": 0.25}]
    assert report.images(report.plot_models, rows, tmp_path) == [report.NO_PLOTS]
    assert "vl-convert-python" in report.NO_PLOTS
    assert list(tmp_path.iterdir()) == []
