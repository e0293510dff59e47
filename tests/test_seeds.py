"""The noise-bar command's naming and aggregation (its DVC run: test_pipeline_dvc)."""

import pytest

from llmpipe import seeds


def experiment(seed: int, perplexity: float) -> dict:
    return {
        "params": {"params.yaml": {"data": {"seed": seed}}},
        "metrics": {"metrics/lora.json": {"data": {"val_perplexity": perplexity}}},
    }


def test_figures_are_aggregated_per_variant_over_the_seeds_that_finished():
    show = [
        {"rev": "workspace", "data": {}, "experiments": None},
        {
            "rev": "abc",
            "data": {},
            "experiments": [
                {
                    "revs": [
                        {
                            "name": seeds.experiment_name(["lora.r=16"], s),
                            "data": experiment(s, ppl),
                        }
                    ]
                }
                for s, ppl in ((0, 100.0), (1, 104.0), (2, 102.0))
            ]
            + [{"revs": [{"name": seeds.experiment_name([], 0), "data": experiment(0, 90.0)}]}],
        },
    ]
    table = seeds.aggregate(show, [["lora.r=16"], []], [0, 1, 2])
    assert table == {
        "lora.r=16": {"lora val perplexity": [100.0, 104.0, 102.0]},
        "baseline": {"lora val perplexity": [90.0]},
    }
    text = seeds.format_table(table)
    assert "| lora val perplexity | 102 ± 2 (3 seeds) | 90 (1 seed) |" in text


def test_experiment_names_are_unique_per_variant_and_seed():
    assert (
        seeds.experiment_name(["lora.r=16", "lora.alpha=32"], 3)
        == "seeds-lora-r-16-lora-alpha-32-s3"
    )
    assert seeds.experiment_name([], 0) == "seeds-baseline-s0"


def test_one_seed_is_refused():
    with pytest.raises(SystemExit):
        seeds.main(["--seeds", "1"])
