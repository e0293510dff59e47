import json

import pytest
from ruamel.yaml import YAML

from conftest import ROOT, run
from llmpipe.errors import ParamsError
from llmpipe.params import read_params_file, validate_all, validate_mapping
from llmpipe.preset import available, compose, load_preset, set_arguments


def test_gpu_preset_is_valid_params():
    assert "gpu" in available()
    validated = validate_mapping(compose(read_params_file(ROOT / "params.yaml"),
                                         load_preset("gpu")))
    assert validated["pretrain"].model.n_embd == 768 and validated["pretrain"].dtype == "bfloat16"
    assert validated["pretrain"].launcher.startswith("torchrun")
    assert validated["finetune"].base == "hf:gpt2"
    assert validated["grpo"].num_generations == 4 and validated["grpo"].beta == 0.1
    assert validated["download"].finetune.sha256.startswith("86c4e6aa")


def test_dvc_applies_the_set_arguments_to_params_yaml(tmp_path):
    # What `dvc exp run -S ...` does with them (Hydra overrides, struct mode: new keys too).
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    overrides = load_preset("gpu")
    apply_overrides(path, [a for a in set_arguments(overrides) if a != "-S"])
    assert validate_all(path)["download"].finetune.sha256 == overrides["download"]["finetune"][
        "sha256"]  # a key the embedded default does not have
    expected = compose(read_params_file(ROOT / "params.yaml"), overrides)
    assert YAML(typ="safe").load(path.read_text()) == expected


def test_unknown_preset_and_bad_overrides_are_clear_errors():
    with pytest.raises(ParamsError, match=r"preset 'tpu': not found \(available: .*gpu"):
        load_preset("tpu")
    base = read_params_file(ROOT / "params.yaml")
    with pytest.raises(ParamsError, match=r"^pretrain\.model\.n_head: 0 is not a positive"):
        validate_mapping(compose(base, {"pretrain": {"model": {"n_head": 0}}}))


def test_write_applies_the_preset_to_params_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    run(["python", "-m", "llmpipe.preset", "gpu", "--write"], tmp_path)
    validated = validate_all(tmp_path / "params.yaml")
    assert validated["tokenize"].tokenizer == "hf:gpt2"
    text = (tmp_path / "params.yaml").read_text()
    assert "# llmpipe params" in text  # comments kept
    printed = run(["python", "-m", "llmpipe.preset", "gpu", "--print"], tmp_path).stdout
    assert "'++pretrain.model.n_layer=12'" in printed
    assert json.dumps("hf:gpt2") in printed
