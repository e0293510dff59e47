import json

import pytest
from ruamel.yaml import YAML

from conftest import ROOT, run
from llmpipe.errors import ParamsError
from llmpipe.params import read_params_file
from llmpipe.pipeline import validate_all, validate_mapping
from llmpipe.preset import available, compose, load_preset, set_arguments


def test_gpu_preset_is_valid_params():
    assert "gpu" in available()
    validated = validate_mapping(
        compose(read_params_file(ROOT / "params.yaml"), load_preset("gpu"))
    )
    assert validated["pretrain"].model.n_embd == 768 and validated["pretrain"].dtype == "bfloat16"
    assert validated["grpo"].processes == 8  # an 8-GPU box: the count is a param for GRPO
    assert validated["finetune"].base == validated["lora"].base == "pretrain"
    assert validated["grpo"].num_generations == 4 and validated["grpo"].beta == 0.1
    assert validated["download"].finetune.sha256.startswith("86c4e6aa")


def test_instruct_preset_is_valid_params():
    validated = validate_mapping(
        compose(read_params_file(ROOT / "params.yaml"), load_preset("instruct"))
    )
    base = "hf:meta-llama/Llama-3.2-1B-Instruct"
    assert validated["finetune"].base == validated["task_sft"].base == base
    assert validated["tokenize"].tokenizer == base
    assert validated["preferences"].chat and validated["task_sft"].chat
    assert validated["preferences"].chosen_column == "full_chosen"
    grpo = validated["grpo"]
    assert (grpo.num_generations, grpo.beta, grpo.use_lora) == (4, 0.1, True)
    assert validated["task_sft"].kind == "gsm8k"


def test_dvc_applies_the_set_arguments_to_params_yaml(tmp_path):
    # What `dvc exp run -S ...` does with them (Hydra overrides, struct mode: new keys too).
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    overrides = load_preset("gpu")
    apply_overrides(path, [a for a in set_arguments(overrides) if a != "-S"])
    assert (
        validate_all(path)["download"].finetune.sha256
        == overrides["download"]["finetune"]["sha256"]
    )
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


# FineWeb-Edu's data card: sample-10BT holds 10B GPT-2 tokens in 14 parquet shards.
FINEWEB_EDU_10BT_TOKENS, FINEWEB_EDU_10BT_SHARDS = 10e9, 14
GPT2_124M_PARAMETERS = 124e6


def test_the_gpu_presets_token_budget():
    from fnmatch import fnmatch

    p = validate_mapping(compose(read_params_file(ROOT / "params.yaml"), load_preset("gpu")))
    corpus, pretrain = p["download"].pretrain, p["pretrain"]
    assert corpus.source.startswith("hf:HuggingFaceFW/fineweb-edu@")  # a pinned revision
    shards = [f"sample/10BT/{i:03d}_00000.parquet" for i in range(FINEWEB_EDU_10BT_SHARDS)]
    chosen = [s for s in shards if any(fnmatch(s, pattern) for pattern in corpus.data_files)]
    unique_train = (
        FINEWEB_EDU_10BT_TOKENS
        * len(chosen)
        / FINEWEB_EDU_10BT_SHARDS
        * (1 - p["tokenize"].val_fraction)
    )
    tokens_per_step = pretrain.batch_size * pretrain.grad_accum_steps * pretrain.model.block_size
    trained = tokens_per_step * pretrain.max_steps
    assert tokens_per_step == 524_288  # GPT-2's batch of 0.5M tokens
    assert trained >= 20 * GPT2_124M_PARAMETERS  # Chinchilla: 20 tokens per parameter
    assert trained <= unique_train, f"{trained:.3g} tokens trained, {unique_train:.3g} unique"
    for gpus in (1, 2, 4, 8):  # the same global batch on every box
        assert pretrain.grad_accum_steps % gpus == 0
    assert -(-50257 // pretrain.model.vocab_multiple) * pretrain.model.vocab_multiple == 50304
