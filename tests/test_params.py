import dataclasses
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run, set_params, subprocess_env  # noqa: F401
from llmpipe.data.params import DownloadParams, TokenizeParams
from llmpipe.errors import ParamsError
from llmpipe.params import load_stage_params
from llmpipe.pipeline import STAGE_SCHEMAS, validate_all
from llmpipe.train.params import FinetuneParams, PretrainParams


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


BASE = (ROOT / "params.yaml").read_text()


def test_project_params_are_valid():
    validated = validate_all(ROOT / "params.yaml")
    assert validated["tokenize"].vocab_size > 0


def test_floats_in_exponent_notation_are_numbers(tmp_path):
    text = BASE.replace("val_fraction: 0.1", "val_fraction: 5e-2")
    _, params = load_stage_params(TokenizeParams, write(tmp_path, text))
    assert params.val_fraction == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("vocab_size: 4096", "vocab_size: -5", "tokenize.vocab_size: -5 is not a positive integer"),
        (
            "vocab_size: 4096",
            "vocab_size: many",
            "tokenize.vocab_size: 'many' is not a positive integer",
        ),
        (
            "vocab_size: 4096",
            "vocab_size: 4096\n  vocab_sise: 10",
            "tokenize.vocab_sise: unknown key (allowed: min_frequency, num_proc, tokenizer, "
            "train_bytes, trust_remote_code, val_fraction, vocab_size)",
        ),
        (
            "val_fraction: 0.1",
            "val_fraction: 1.0",
            "tokenize.val_fraction: 1.0 is not a number strictly between 0 and 1",
        ),
        (
            "val_fraction: 0.1",
            "val_fraction: 0",
            "tokenize.val_fraction: 0.0 is not a number strictly between 0 and 1",
        ),
        (
            "val_fraction: 0.1",
            "val_fraction: true",
            "tokenize.val_fraction: True is not a number strictly between 0 and 1",
        ),
        (
            "min_frequency: 2",
            "min_frequency: 2.5",
            "tokenize.min_frequency: 2.5 is not a positive integer",
        ),
    ],
)
def test_bad_tokenize_params(tmp_path, old, new, message):
    assert old in BASE
    with pytest.raises(ParamsError) as err:
        load_stage_params(TokenizeParams, write(tmp_path, BASE.replace(old, new, 1)))
    assert str(err.value) == message


def test_unknown_source_scheme(tmp_path):
    text = BASE.replace("source: stdlib:reference", "source: ftp://example.org/x.txt")
    with pytest.raises(
        ParamsError,
        match=r"^download\.finetune\.source: 'ftp://example.org/x.txt'"
        r" is not a corpus source",
    ):
        load_stage_params(DownloadParams, write(tmp_path, text))


def test_missing_key_and_unknown_section(tmp_path):
    with pytest.raises(ParamsError, match=r"^tokenize\.vocab_size: missing \(required\)$"):
        load_stage_params(TokenizeParams, write(tmp_path, BASE.replace("  vocab_size: 4096\n", "")))
    with pytest.raises(ParamsError, match=r"^tokenise: unknown key"):
        load_stage_params(TokenizeParams, write(tmp_path, BASE + "\ntokenise: {}\n"))


def test_a_stage_reads_only_its_own_section(tmp_path):
    # A broken download section does not stop tokenize: DVC tracks sections separately.
    text = BASE.replace("source: stdlib:reference", "source: nowhere:x")
    _, params = load_stage_params(TokenizeParams, write(tmp_path, text))
    assert params.vocab_size == 4096


def test_bad_params_stop_the_stage_with_one_line(tmp_path):
    write(tmp_path, BASE.replace("vocab_size: 4096", "vocab_size: -5"))
    result = run(["python", "-m", "stages.tokenize"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: tokenize.vocab_size: -5 is not a positive integer"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "    n_head: 4\n",
            "    n_head: 3\n",
            "pretrain.model.n_embd: 128 is not divisible by n_head (3)",
        ),
        ("    bias: true", "    bias: 1", "pretrain.model.bias: 1 is not a boolean (true/false)"),
        (
            "  max_steps: 512",
            "  max_steps: 30",
            "pretrain.warmup_steps: 50 is not less than max_steps (30)",
        ),
        (
            "  min_lr: 3.0e-4",
            "  min_lr: 1.0",
            "pretrain.min_lr: 1.0 is more than learning_rate (0.003)",
        ),
        (
            "  learning_rate: 3.0e-3",
            "  learning_rate: .inf",
            "pretrain.learning_rate: inf is not a positive number",
        ),
        (
            "    top_p: null\n\nfinetune",
            "    top_p: 0\n\nfinetune",
            "pretrain.sample.top_p: 0.0 is not a number in (0, 1]",
        ),
        (
            '    prompts: ["Return the", "This module provides"]',
            "    prompts: []",
            "pretrain.sample.prompts: [] is not a non-empty list",
        ),
        (
            "  dtype: bfloat16        # autocast over float32 master",
            "  dtype: float64 #",
            "pretrain.dtype: 'float64' is not one of 'float32', 'bfloat16', 'float16'",
        ),
    ],
)
def test_bad_pretrain_params(tmp_path, old, new, message):
    assert old in BASE, old
    with pytest.raises(ParamsError) as err:
        load_stage_params(PretrainParams, write(tmp_path, BASE.replace(old, new, 1)))
    assert str(err.value) == message


def test_optional_and_union_values(tmp_path):
    _, p = load_stage_params(
        PretrainParams, write(tmp_path, BASE.replace("  peak_flops: null", "  peak_flops: 1.0e12"))
    )
    assert p.peak_flops == 1e12
    finetune_dtype = "  dtype: bfloat16        # autocast over float32 weights"
    assert finetune_dtype in BASE
    _, f = load_stage_params(
        FinetuneParams, write(tmp_path, BASE.replace(finetune_dtype, "  dtype: float32 #"))
    )
    assert f.dtype == "float32"
    with pytest.raises(ParamsError, match=r"^finetune\.dtype: 'auto' is not one of "):
        load_stage_params(
            FinetuneParams, write(tmp_path, BASE.replace(finetune_dtype, "  dtype: auto #"))
        )


@pytest.mark.parametrize("stage", ["grpo", "task_grpo"])
def test_grpos_process_count_is_a_positive_integer(tmp_path, stage):
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, {f"{stage}.processes": 0})
    with pytest.raises(ParamsError, match=rf"^{stage}\.processes: 0 is not a positive integer"):
        load_stage_params(STAGE_SCHEMAS[stage], tmp_path / "params.yaml")


def test_no_section_says_where_a_stage_runs():
    """Where a stage runs is the executor's (llmpipe.launch), outside every stage's hash."""
    for stage, schema in STAGE_SCHEMAS.items():
        names = {f.name for f in dataclasses.fields(schema)}
        assert not names & {"launcher", "executor", "nproc_per_node"}, stage
