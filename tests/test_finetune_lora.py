import dataclasses
import json
import math

import pytest
import torch

from conftest import SAMPLE_DOCS
from llmpipe import layout
from llmpipe.data.tokenization import train_bpe
from llmpipe.errors import DataError, ParamsError
from llmpipe.model.gpt import GPT, GPTConfig
from llmpipe.model.hf import export_hf_gpt2
from llmpipe.model.loading import load_causal_lm
from llmpipe.params import load_stage_params
from llmpipe.pipeline import STAGE_SCHEMAS
from llmpipe.train.causal_lm import open_token_data, train, val_perplexity
from llmpipe.train.lora import lora_config, parameter_counts, save_adapter

MICRO = {
    "block_size": 32,
    "batch_size": 8,
    "max_steps": 40,
    "eval_interval": 10,
    "eval_windows": 8,
    "warmup_steps": 2,
}


def stage_params(workspace, stage, **changes):
    shared, p = load_stage_params(STAGE_SCHEMAS[stage], workspace / "params.yaml")
    return shared.seed, dataclasses.replace(p, **{**MICRO, **changes})


def base_and_data(workspace, p):
    model, tokenizer = load_causal_lm(workspace / layout.PRETRAIN_MODEL)
    train_bin, val_bin = open_token_data(
        workspace / layout.tokens("finetune"), model, tokenizer, p.base
    )
    return model, tokenizer, train_bin, val_bin


def test_finetuning_lowers_validation_perplexity(micro_pretrained, tmp_path):
    seed, p = stage_params(micro_pretrained, "finetune", learning_rate=3e-3)
    model, _, train_bin, val_bin = base_and_data(micro_pretrained, p)
    before = val_perplexity(model, val_bin, p)
    result = train(
        model, p, seed, train_bin, val_bin, tmp_path / "work", tmp_path / "live", p.grad_accum_steps
    )
    after = val_perplexity(result.model, val_bin, p)
    assert after < 0.8 * before
    assert after > 5  # real text: a perplexity near 1 would mean validation leaked into training
    assert (tmp_path / "live/plots/metrics/eval/loss.tsv").exists()
    assert not (tmp_path / "work").exists()


def hf_eval_loss(model, val_bin, p):
    """The Trainer's eval_loss: mean over windows of the model's own shifted loss."""
    model.eval()
    with torch.no_grad():
        losses = [
            model(input_ids=x, labels=x).loss.item() * len(x)
            for x, _ in val_bin.eval_batches(p.block_size, p.eval_windows, p.batch_size)
        ]
    return sum(losses) / len(val_bin.eval_starts(p.block_size, p.eval_windows))


def test_early_stopping_keeps_the_best_checkpoint(micro_pretrained, tmp_path):
    # A learning rate far too high makes validation loss rise: training must stop early and
    # return the weights of the best evaluation, not the last. In float32: the Trainer's
    # evaluations run under the run's autocast, ours of the returned model in its weights'
    # precision, which agree to 1e-4 only without bf16 (3e-4 apart with it).
    seed, p = stage_params(
        micro_pretrained,
        "finetune",
        dtype="float32",
        learning_rate=0.05,
        warmup_steps=0,
        eval_interval=2,
        max_steps=40,
        early_stopping_patience=1,
    )
    model, _, train_bin, val_bin = base_and_data(micro_pretrained, p)
    result = train(
        model, p, seed, train_bin, val_bin, tmp_path / "work", tmp_path / "live", p.grad_accum_steps
    )
    steps, losses = zip(*result.eval_losses, strict=True)
    assert result.steps < p.max_steps
    assert losses[-1] > losses[-2]  # stopped because it stopped improving
    assert result.best_step == steps[losses.index(min(losses))]
    assert result.best_step < result.steps
    assert hf_eval_loss(result.model, val_bin, p) == pytest.approx(min(losses), abs=1e-4)


def test_the_checkpoint_is_chosen_on_the_selection_split_not_the_reported_windows(
    micro_pretrained, tmp_path
):
    from llmpipe.train.causal_lm import run_stage, selection_split

    seed, p = stage_params(
        micro_pretrained,
        "finetune",
        base=str(micro_pretrained / layout.PRETRAIN_MODEL),
        max_steps=4,
        eval_interval=2,
    )
    run = run_stage(
        "finetune",
        p,
        seed,
        micro_pretrained / layout.tokens("finetune"),
        tmp_path / "work",
        tmp_path / "live",
    )
    _, _, train_bin, val_bin = base_and_data(micro_pretrained, p)
    _, selection_bin = selection_split(train_bin, p, "finetune")
    best = dict(run.result.eval_losses)[run.result.best_step]
    assert hf_eval_loss(run.result.model, selection_bin, p) == pytest.approx(best, abs=1e-4)
    assert hf_eval_loss(run.result.model, val_bin, p) != pytest.approx(best, abs=1e-3)
    too_small = dataclasses.replace(p, selection_fraction=1e-6)  # inside the last document
    with pytest.raises(ParamsError, match=r"^finetune\.selection_fraction: 1e-06 of .* leaves 0 "):
        selection_split(train_bin, too_small, "finetune")


def test_vocabulary_mismatch_names_both_sizes(micro_pretrained, tmp_path):
    other_tokenizer = train_bpe(SAMPLE_DOCS, vocab_size=300, min_frequency=1)
    size = len(other_tokenizer)
    export_hf_gpt2(
        GPT(GPTConfig(vocab_size=size, block_size=32, n_layer=1, n_head=2, n_embd=16)),
        tmp_path / "other",
        tokenizer=other_tokenizer,
    )
    model, tokenizer = load_causal_lm(tmp_path / "other")
    with pytest.raises(
        DataError, match=f"vocabulary of 512, but the model has a vocabulary of {size}"
    ):
        open_token_data(micro_pretrained / layout.tokens("finetune"), model, tokenizer, "other")


def test_an_embedding_padded_past_the_tokenizer_reads_its_token_data(micro_pretrained, tmp_path):
    # Qwen2.5 pads its embedding matrix to a multiple of 128, past its tokenizer's tokens.
    model, tokenizer = load_causal_lm(micro_pretrained / layout.PRETRAIN_MODEL)
    model.resize_token_embeddings(len(tokenizer) + 128)
    train_bin, _ = open_token_data(
        micro_pretrained / layout.tokens("finetune"), model, tokenizer, "padded"
    )
    assert train_bin.vocab_size == len(tokenizer)


@pytest.fixture(scope="module")
def trained_lora(micro_pretrained, tmp_path_factory):
    from peft import get_peft_model

    tmp = tmp_path_factory.mktemp("lora")
    seed, p = stage_params(micro_pretrained, "lora", max_steps=20, learning_rate=1e-2)
    base, tokenizer, train_bin, val_bin = base_and_data(micro_pretrained, p)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, lora_config(base, p))
    result = train(
        model, p, seed, train_bin, val_bin, tmp / "work", tmp / "live", p.grad_accum_steps
    )
    return micro_pretrained, tmp, p, before, result.model, val_bin


def test_lora_trains_only_adapter_weights(trained_lora):
    _, _, _, before, model, _ = trained_lora
    trainable, total = parameter_counts(model)
    assert 0 < trainable < total
    changed_adapters = 0
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
        if "lora_B" in name:
            changed_adapters += int(param.abs().sum() > 0)  # lora_B starts at zero
    assert changed_adapters > 0
    base_state = model.get_base_model().state_dict()
    compared = 0
    for key, value in base_state.items():
        if "lora_" in key:
            continue
        original = key.replace(".base_layer", "")
        assert torch.equal(value, before[original]), key
        compared += 1
    assert compared == len(before)


def test_adapter_reload_and_merge_give_the_same_logits(trained_lora, tmp_path):
    from peft import PeftModel

    workspace, _, p, _, model, val_bin = trained_lora
    x, _ = next(val_bin.eval_batches(p.block_size, 4, 4))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter/adapter_model.safetensors").exists()
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    # all-linear on GPT-2, sorted: not a set's hash order
    assert p.target_modules == ["all-linear"]
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    fresh, _ = load_causal_lm(workspace / layout.PRETRAIN_MODEL)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, expected, atol=1e-6)
        merged = reloaded.merge_and_unload()
        assert (merged(input_ids=x).logits - expected).abs().max() < 1e-5


def test_unknown_target_module_is_a_clear_error(micro_pretrained):
    _, p = stage_params(micro_pretrained, "lora", target_modules=["q_proj"])
    model, _ = load_causal_lm(micro_pretrained / layout.PRETRAIN_MODEL)
    with pytest.raises(
        ParamsError,
        match=r"lora\.target_modules: \['q_proj'\] not in the base "
        r"model \(its linear layers: .*c_attn",
    ):
        lora_config(model, p)


def test_all_linear_adapts_every_linear_layer_but_the_head_of_any_architecture():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from llmpipe.train.lora import adapter_config

    small = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    llama_like = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    for model, expected, transposed in (
        (LlamaForCausalLM(LlamaConfig(**small)), llama_like, False),
        (Qwen2ForCausalLM(Qwen2Config(**small)), llama_like, False),
        (
            GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)),
            ["c_attn", "c_fc", "c_proj"],
            True,
        ),
    ):
        config = adapter_config(model, 4, 8, 0.0, ["all-linear"], "lora.target_modules")
        assert sorted(config.target_modules) == expected, type(model).__name__
        assert config.fan_in_fan_out is transposed  # GPT-2's Conv1D stores (in, out)
    with pytest.raises(
        ParamsError,
        match=r"lora.target_modules: \['c_attn'\] not in the base "
        r"model \(its linear layers: down_proj, gate_proj",
    ):
        adapter_config(
            LlamaForCausalLM(LlamaConfig(**small)), 4, 8, 0.0, ["c_attn"], "lora.target_modules"
        )


def checkpointed(model) -> bool:
    """Whether the model's blocks recompute their activations (the flag transformers sets on
    them, whatever its version calls the switch)."""
    return any(
        getattr(module, "gradient_checkpointing", False) is True for module in model.modules()
    )


@pytest.mark.parametrize("stage", ["finetune", "lora"])
def test_gradient_checkpointing_trains_the_same_steps(micro_pretrained, tmp_path, stage):
    """Activations recomputed in the backward pass (non-reentrant: a LoRA's frozen embeddings
    need no input that requires grad, and dropout draws the same masks): the same losses."""
    from peft import get_peft_model

    results = []
    for checkpointing in (False, True):
        seed, p = stage_params(
            micro_pretrained,
            stage,
            max_steps=4,
            eval_interval=2,
            gradient_checkpointing=checkpointing,
        )
        model, _, train_bin, val_bin = base_and_data(micro_pretrained, p)
        if stage == "lora":
            torch.manual_seed(seed)  # the adapter's initial weights
            model = get_peft_model(model, lora_config(model, p))
        result = train(
            model,
            p,
            seed,
            train_bin,
            val_bin,
            tmp_path / f"work{checkpointing}",
            tmp_path / f"live{checkpointing}",
            p.grad_accum_steps,
        )
        assert checkpointed(result.model) is checkpointing
        results.append(result)
    off, on = results
    assert on.train_loss == pytest.approx(off.train_loss, abs=1e-5)
    assert [loss for _, loss in on.eval_losses] == pytest.approx(
        [loss for _, loss in off.eval_losses], abs=1e-5
    )
    assert on.eval_losses[-1][1] < on.eval_losses[0][1] + 1.0  # it trained, sanely
    if stage == "lora":  # the adapters got gradients through the recomputed blocks
        assert any(
            param.abs().sum() > 0 for name, param in on.model.named_parameters() if "lora_B" in name
        )


@pytest.mark.parametrize("stage", ["finetune", "lora"])
def test_a_bf16_base_trains_float32_weights(micro_pretrained, tmp_path, stage):
    """transformers 5 loads a checkpoint saved in bf16 in bf16: the stage trains float32 master
    weights all the same (a full finetune's every weight, a LoRA's adapters; its frozen base
    keeps bf16)."""
    from peft import get_peft_model

    from llmpipe.train.causal_lm import run_stage

    model, tokenizer = load_causal_lm(micro_pretrained / layout.PRETRAIN_MODEL)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    assert next(load_causal_lm(tmp_path / "bf16")[0].parameters()).dtype == torch.bfloat16
    seed, p = stage_params(
        micro_pretrained, stage, base=str(tmp_path / "bf16"), max_steps=4, eval_interval=2
    )
    adapt = (lambda base: get_peft_model(base, lora_config(base, p))) if stage == "lora" else None
    run = run_stage(
        stage,
        p,
        seed,
        micro_pretrained / layout.tokens("finetune"),
        tmp_path / "work",
        tmp_path / "live",
        adapt,
    )
    trained = {param.dtype for param in run.result.model.parameters() if param.requires_grad}
    frozen = {param.dtype for param in run.result.model.parameters() if not param.requires_grad}
    assert trained == {torch.float32}
    assert frozen == ({torch.bfloat16} if stage == "lora" else set())
    assert math.isfinite(run.perplexity) and math.isfinite(run.base_perplexity)


@pytest.mark.parametrize("stage", ["finetune", "lora", "task_sft"])
def test_gradient_checkpointing_is_a_boolean(stage):
    from conftest import ROOT
    from llmpipe.params import build, read_params_file

    raw = read_params_file(ROOT / "params.yaml")[stage]
    assert build(STAGE_SCHEMAS[stage], raw, stage).gradient_checkpointing is False
    with pytest.raises(
        ParamsError,
        match=rf"^{stage}\.gradient_checkpointing: 'yes' is not a "
        r"boolean \(true/false\)$",
    ):
        build(STAGE_SCHEMAS[stage], {**raw, "gradient_checkpointing": "yes"}, stage)


HUB_KERNELS_PROBE = """
import sys
import llmpipe  # sets the default before anything loads
from transformers import AutoModelForCausalLM
print(AutoModelForCausalLM.from_pretrained(sys.argv[1], use_safetensors=True).use_kernels)
"""


@pytest.mark.parametrize(("setting", "expected"), [(None, "False"), ("YES", "True")])
def test_hub_kernels_are_off_unless_the_environment_asks(tmp_path, setting, expected):
    """transformers turns hub kernels on by default when `kernels` is installed: on a GPU a
    load then fetches code from the hub, and fails offline (the first GPU check: finetune's
    model.eval()). Any load after importing llmpipe, TRL's reference model included, has them
    off; USE_HUB_KERNELS=YES turns them back on."""
    import subprocess
    import sys

    from conftest import save_micro_model, subprocess_env

    save_micro_model(tmp_path / "model")
    env = subprocess_env()
    env.pop("USE_HUB_KERNELS", None)
    if setting is not None:
        env["USE_HUB_KERNELS"] = setting
    result = subprocess.run(
        [sys.executable, "-c", HUB_KERNELS_PROBE, str(tmp_path / "model")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == expected
