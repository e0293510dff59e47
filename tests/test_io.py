import json

from llmpipe import layout
from llmpipe.io import rounded, write_metrics
from llmpipe.stage import way_back


def test_metrics_are_rounded_once_where_they_are_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_metrics(
        "stage",
        {
            "val_perplexity": 111.896612,
            "train_loss": 4.71234567,
            "steps": 800,
            "flag": True,
            "name": "x",
            "nested": {"score": 0.123456, "val_loss": 1.23456789},
            "perf": {"tokens_per_s": 17234.56, "mfu": 0.0512345, "by_model": {"a": 1234.5678}},
        },
    )
    assert json.loads((tmp_path / layout.metrics_file("stage")).read_text()) == {
        "val_perplexity": 111.8966,
        "train_loss": 4.712346,
        "steps": 800,
        "flag": True,
        "name": "x",
        "nested": {"score": 0.1235, "val_loss": 1.234568},
        # timings: four significant digits
        "perf": {"tokens_per_s": 17230.0, "mfu": 0.05123, "by_model": {"a": 1235.0}},
    }


def test_rounding_is_idempotent_and_keeps_lists():
    once = rounded({"x": [0.123456, 2], "perf": [1.23456], "tokens_per_s": 238.4215})
    assert once == {"x": [0.1235, 2], "perf": [1.235], "tokens_per_s": 238.4} == rounded(once)


def test_the_way_back_names_the_stage_and_its_git_outputs():
    assert way_back(None) == ""  # outside DVC nothing was removed
    assert way_back("finetune").endswith(
        "dvc checkout finetune && git checkout -- metrics/finetune.json "
        "metrics/items/finetune.json dvclive/finetune/plots/metrics)"
    )
    assert "metrics/evaluate_models.json" in way_back("evaluate")
