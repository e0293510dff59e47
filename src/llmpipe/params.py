"""Typed, validated params.yaml.

Each stage calls `load_stage_params(<its schema>)`, e.g. `load_stage_params(FinetuneParams)`,
and gets the shared keys plus its own section as frozen dataclasses of those types.
Validation is strict, because a typo in params.yaml that is silently ignored makes a DVC
experiment compare two identical runs: an unknown key, a wrong type or an out-of-range value
stops the stage with one line naming the dotted key, the value and what is allowed,
e.g. ``tokenize.vocab_size: -5 is not a positive integer``.

The schema is the dataclasses below: the type annotation gives the type, `param(<check>)` the
range. No field has a default: every value comes from params.yaml, which spells out every key,
so that DVC, which tracks params.yaml and not this file, sees every value a stage uses.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from llmpipe.errors import ParamsError

PARAMS_FILE = Path("params.yaml")


# --- checks: each returns True when the value is allowed, and carries the words for what is --


@dataclass(frozen=True)
class Check:
    allowed: str  # completes "<key>: <value> is not ..."
    predicate: Callable[[Any], bool]


POSITIVE_INT = Check("a positive integer", lambda v: v > 0)
NON_NEGATIVE_INT = Check("a non-negative integer", lambda v: v >= 0)
POSITIVE_NUMBER = Check("a positive number", lambda v: v > 0)
NON_NEGATIVE_NUMBER = Check("a non-negative number", lambda v: v >= 0)
OPEN_UNIT_INTERVAL = Check("a number strictly between 0 and 1", lambda v: 0 < v < 1)
UNIT_INTERVAL = Check("a number between 0 and 1", lambda v: 0 <= v <= 1)
HALF_OPEN_UNIT_INTERVAL = Check("a number in [0, 1)", lambda v: 0 <= v < 1)
PROBABILITY_MASS = Check("a number in (0, 1]", lambda v: 0 < v <= 1)
SHA256 = Check(
    "a sha256 hex digest (64 hex characters)",
    lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v.lower()),
)


def _has_scheme(value: str, schemes: tuple[str, ...]) -> bool:
    """`scheme:rest` with a known scheme and a non-empty rest."""
    scheme, sep, rest = value.partition(":")
    return scheme in schemes and sep == ":" and rest != ""


def _hf_or_dir(value: str) -> bool:
    return _has_scheme(value, ("hf",)) or (value != "" and ":" not in value)


CORPUS_SOURCE = Check(
    "a corpus source: stdlib:docstrings, stdlib:reference, hf:<dataset>[:<config>][@<revision>], "
    "url:<address> or file:<path>",
    lambda v: v in ("stdlib:docstrings", "stdlib:reference")
    or _has_scheme(v, ("hf", "url", "file")),
)
TOKENIZER_SOURCE = Check("a tokenizer: bpe, hf:<name> or a directory",
                         lambda v: v == "bpe" or _hf_or_dir(v))
MODEL_SOURCE = Check("a model source: scratch, hf:<name> or a directory",
                     lambda v: v == "scratch" or _hf_or_dir(v))
BASE_MODEL = Check("pretrain (the pipeline's own model), hf:<name> or a directory",
                   lambda v: v == "pretrain" or _hf_or_dir(v))
GOLD_SCORER = Check("vader, hf:<name> or a directory (a text-classification model)",
                    lambda v: v == "vader" or _hf_or_dir(v))
PREFERENCE_SOURCE = Check("generate, hf:<dataset>[:<config>] or file:<path>",
                          lambda v: v == "generate" or _has_scheme(v, ("hf", "file")))



def _is_launcher(value: str) -> bool:
    words = value.split()
    if any(w == "-m" or w.startswith("stages.") for w in words):
        return False  # dvc.yaml appends `-m stages.<name>` itself
    return (words in (["python"], ["python3"]) or words[:1] == ["torchrun"]
            or words[:2] == ["accelerate", "launch"])


LAUNCHER = Check("a launcher: python, torchrun <options> or accelerate launch <options> "
                 "(dvc.yaml appends -m stages.<name>)", _is_launcher)


def param(check: Check) -> Any:
    return dataclasses.field(metadata={"check": check})


# --- the schema ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CorpusParams:
    source: str = param(CORPUS_SOURCE)
    split: str  # hf: datasets only
    text_column: str  # hf:, file: .jsonl and .parquet
    sha256: str | None = param(SHA256)  # required for url:, optional for file:
    data_files: list[str] | None  # hf: the files to read (glob patterns), e.g. parquet shards
    max_documents: int | None = param(POSITIVE_INT)  # caps, for a sample of a large corpus
    max_bytes: int | None = param(POSITIVE_INT)

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.data_files is not None and not self.source.startswith("hf:"):
            return [("data_files", f"{self.data_files} applies to hf: sources only (file: takes "
                                   "a glob in its path)")]
        return []


@dataclass(frozen=True, kw_only=True)
class DownloadParams:
    pretrain: CorpusParams
    finetune: CorpusParams


@dataclass(frozen=True, kw_only=True)
class TokenizeParams:
    tokenizer: str = param(TOKENIZER_SOURCE)
    vocab_size: int = param(POSITIVE_INT)  # bpe only; a pretrained tokenizer has its own
    min_frequency: int = param(POSITIVE_INT)
    val_fraction: float = param(OPEN_UNIT_INTERVAL)
    train_bytes: int | None = param(POSITIVE_INT)  # bpe: train on at most this much text
    num_proc: int | None = param(POSITIVE_INT)  # encoding processes; None: one per core
    trust_remote_code: bool


@dataclass(frozen=True, kw_only=True)
class ModelParams:
    n_layer: int = param(POSITIVE_INT)
    n_head: int = param(POSITIVE_INT)
    n_embd: int = param(POSITIVE_INT)
    block_size: int = param(POSITIVE_INT)
    dropout: float = param(HALF_OPEN_UNIT_INTERVAL)
    bias: bool
    vocab_multiple: int = param(POSITIVE_INT)  # embedding rows padded to a multiple (GPU: 64)

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.n_embd % self.n_head:
            return [("n_embd", f"{self.n_embd} is not divisible by n_head ({self.n_head})")]
        return []


@dataclass(frozen=True, kw_only=True)
class SampleParams:
    prompts: list[str]
    max_new_tokens: int = param(POSITIVE_INT)
    temperature: float = param(NON_NEGATIVE_NUMBER)
    top_k: int | None = param(POSITIVE_INT)
    top_p: float | None = param(PROBABILITY_MASS)


@dataclass(frozen=True, kw_only=True)
class PretrainParams:
    launcher: str = param(LAUNCHER)  # dvc.yaml runs `<launcher> -m stages.pretrain`
    init: str = param(MODEL_SOURCE)
    model: ModelParams
    batch_size: int = param(POSITIVE_INT)  # per process and micro-step
    grad_accum_steps: int = param(POSITIVE_INT)  # for the whole run, over all processes
    max_steps: int = param(POSITIVE_INT)
    learning_rate: float = param(POSITIVE_NUMBER)
    min_lr: float = param(NON_NEGATIVE_NUMBER)
    warmup_steps: int = param(NON_NEGATIVE_INT)
    weight_decay: float = param(NON_NEGATIVE_NUMBER)
    beta1: float = param(OPEN_UNIT_INTERVAL)
    beta2: float = param(OPEN_UNIT_INTERVAL)
    grad_clip: float = param(NON_NEGATIVE_NUMBER)  # 0 turns clipping off
    device: Literal["auto", "cpu", "cuda"]
    dtype: Literal["float32", "bfloat16", "float16"]
    compile: bool
    chunked_loss: bool  # the loss without the full logits (model/loss.py); off where they fit
    gradient_checkpointing: bool  # recompute activations in backward: memory for compute
    eval_interval: int = param(POSITIVE_INT)
    eval_windows: int = param(POSITIVE_INT)
    checkpoint_interval: int = param(POSITIVE_INT)
    peak_flops: float | None = param(POSITIVE_NUMBER)  # None: the GPU's data sheet, or measured
    trust_remote_code: bool
    sample: SampleParams | None  # null: no sample generations

    def cross_field_problems(self) -> list[tuple[str, str]]:
        return _schedule_problems(self) + (
            [("min_lr", f"{self.min_lr} is more than learning_rate ({self.learning_rate})")]
            if self.min_lr > self.learning_rate else [])


def _schedule_problems(p: Any) -> list[tuple[str, str]]:
    problems = []
    if p.warmup_steps >= p.max_steps:
        problems.append(("warmup_steps", f"{p.warmup_steps} is not less than max_steps "
                                         f"({p.max_steps})"))
    if p.eval_interval > p.max_steps:
        problems.append(("eval_interval", f"{p.eval_interval} is more than max_steps "
                                          f"({p.max_steps}): there would be no evaluation"))
    return problems


@dataclass(frozen=True, kw_only=True)
class CausalLMTrainingParams:
    """What finetune and lora share: the launcher, the base, the data and the optimisation."""

    launcher: str = param(LAUNCHER)
    base: str = param(BASE_MODEL)
    block_size: int = param(POSITIVE_INT)
    batch_size: int = param(POSITIVE_INT)  # windows per process and micro-step
    grad_accum_steps: int = param(POSITIVE_INT)  # micro-steps per optimizer step, all processes
    max_steps: int = param(POSITIVE_INT)
    learning_rate: float = param(POSITIVE_NUMBER)
    warmup_steps: int = param(NON_NEGATIVE_INT)
    weight_decay: float = param(NON_NEGATIVE_NUMBER)
    eval_interval: int = param(POSITIVE_INT)
    eval_windows: int = param(POSITIVE_INT)
    early_stopping_patience: int = param(POSITIVE_INT)
    bf16: bool | Literal["auto"]  # auto: bf16 on CUDA only
    # recompute each layer's activations in the backward pass: less memory, ~30% more compute
    gradient_checkpointing: bool
    trust_remote_code: bool

    def cross_field_problems(self) -> list[tuple[str, str]]:
        return _schedule_problems(self)


@dataclass(frozen=True, kw_only=True)
class FinetuneParams(CausalLMTrainingParams):
    pass


@dataclass(frozen=True, kw_only=True)
class LoraParams(CausalLMTrainingParams):
    r: int = param(POSITIVE_INT)
    alpha: int = param(POSITIVE_INT)
    dropout: float = param(HALF_OPEN_UNIT_INTERVAL)
    target_modules: list[str]


@dataclass(frozen=True, kw_only=True)
class QuantizeParams:
    source: Literal["finetune", "lora"]
    method: Literal["dynamic_int8", "weight_only_int8", "static_int8"]
    block_size: int = param(POSITIVE_INT)
    eval_windows: int = param(POSITIVE_INT)
    batch_size: int = param(POSITIVE_INT)
    generate_tokens: int = param(POSITIVE_INT)  # per timed generation
    repeats: int = param(POSITIVE_INT)  # timed runs after a warm-up; the median counts
    compile: bool  # also time the compiled static-cache decoder (a C++ compiler on CPU)
    calibration_windows: int = param(POSITIVE_INT)  # static_int8: training windows
    device: Literal["auto", "cpu", "cuda"]  # where int8 and fp32 are measured

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.device == "cuda" and self.method != "weight_only_int8":
            return [("method", f"{self.method} runs on the CPU only; with device cuda use "
                               "weight_only_int8 (torchao's kernels), or set device: cpu")]
        return []


@dataclass(frozen=True, kw_only=True)
class PreferencesParams:
    source: str = param(PREFERENCE_SOURCE)
    gold_scorer: str = param(GOLD_SCORER)
    gold_label: str | None  # the label to reward, for a classifier gold scorer
    # minus this weight x the share of repeated word trigrams (llmpipe.gold): loops don't pay
    gold_repetition_penalty: float = param(NON_NEGATIVE_NUMBER)
    split: str  # hf:/file: sets
    heldout_fraction: float = param(OPEN_UNIT_INTERVAL)  # hf:/file: sets
    # hf:/file: sets: the columns holding the prompt and the two completions (plain text)
    prompt_column: str
    chosen_column: str
    rejected_column: str
    # prompts are a user turn of the tokenizer's chat template (an instruct model), for every
    # stage that reads the preference set (llmpipe.chat)
    chat: bool
    prompt_tokens: int = param(POSITIVE_INT)
    completion_tokens: int = param(POSITIVE_INT)
    samples_per_prompt: int = param(Check("an integer of at least 2", lambda v: v >= 2))
    pairs_per_prompt: int = param(POSITIVE_INT)
    train_prompts: int = param(POSITIVE_INT)
    heldout_prompts: int = param(POSITIVE_INT)
    temperature: float = param(POSITIVE_NUMBER)
    top_k: int | None = param(POSITIVE_INT)

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if 2 * self.pairs_per_prompt > self.samples_per_prompt:
            return [("pairs_per_prompt", f"{self.pairs_per_prompt} needs at least "
                                         f"{2 * self.pairs_per_prompt} samples_per_prompt")]
        return []


@dataclass(frozen=True, kw_only=True)
class RewardModelParams:
    launcher: str = param(LAUNCHER)
    learning_rate: float = param(POSITIVE_NUMBER)
    warmup_steps: int = param(NON_NEGATIVE_INT)
    epochs: int = param(POSITIVE_INT)
    batch_size: int = param(POSITIVE_INT)  # pairs per step, over all processes
    max_length: int = param(POSITIVE_INT)  # tokens of prompt + completion


AT_LEAST_TWO = Check("an integer of at least 2 (a group)", lambda v: v >= 2)


@dataclass(frozen=True, kw_only=True)
class GrpoTrainingParams:
    """How TRL's GRPO trains (grpo, task_grpo)."""

    launcher: str = param(LAUNCHER)
    use_vllm: bool  # generation in vLLM (TRL's colocate mode; CUDA, the [gpu] extra)
    use_lora: bool
    lora_r: int = param(POSITIVE_INT)
    lora_alpha: int = param(POSITIVE_INT)
    lora_target_modules: list[str]
    num_generations: int = param(AT_LEAST_TWO)
    prompts_per_step: int = param(POSITIVE_INT)  # over all processes
    beta: float = param(NON_NEGATIVE_NUMBER)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"]
    scale_rewards: Literal["group", "batch", "none"]
    learning_rate: float = param(POSITIVE_NUMBER)
    max_completion_length: int = param(POSITIVE_INT)
    temperature: float = param(POSITIVE_NUMBER)
    max_steps: int = param(POSITIVE_INT)


@dataclass(frozen=True, kw_only=True)
class HeldoutReportParams:
    """How an RLHF stage is measured on the held-out prompts (grpo, reinforce)."""

    eval_samples: int = param(POSITIVE_INT)  # completions per held-out prompt
    # The over-optimisation curve: gold, reward model and KL on the first curve_prompts held-out
    # prompts every curve_interval steps (0: no curve; under FSDP/ZeRO-3 sharding, 0)
    curve_interval: int = param(NON_NEGATIVE_INT)
    curve_prompts: int = param(POSITIVE_INT)
    # The degeneration flag: gold rose while distinct bigrams fell by more than this share...
    degeneration_distinct_drop: float = param(OPEN_UNIT_INTERVAL)
    # ...or the reference's loss on the completions rose by more than this (nats per token).
    degeneration_fluency_rise: float = param(POSITIVE_NUMBER)


@dataclass(frozen=True, kw_only=True)
class GrpoParams(GrpoTrainingParams, HeldoutReportParams):
    length_penalty: float = param(NON_NEGATIVE_NUMBER)  # weight, per token


@dataclass(frozen=True, kw_only=True)
class PolicyGradientParams:
    """llmpipe.reinforce's loop (reinforce, task_reinforce)."""

    num_generations: int = param(AT_LEAST_TWO)  # k completions per prompt
    prompts_per_step: int = param(POSITIVE_INT)
    max_steps: int = param(POSITIVE_INT)
    learning_rate: float = param(POSITIVE_NUMBER)
    max_completion_length: int = param(POSITIVE_INT)
    temperature: float = param(POSITIVE_NUMBER)
    baseline: Literal["rloo", "group_mean"]
    loss_normalisation: Literal["token", "sequence"]
    beta: float = param(NON_NEGATIVE_NUMBER)  # x the completion's KL, subtracted from its reward
    grad_clip: float = param(POSITIVE_NUMBER)
    # The compute dtype: bfloat16 is autocast over float32 master weights (sampling, log-probs
    # and the reference alike)
    dtype: Literal["float32", "bfloat16"]
    # Completions sampled and scored per forward pass, whole prompt groups (a multiple of
    # num_generations); null: all of a step's at once
    generation_batch_size: int | None = param(POSITIVE_INT)
    reference_device: Literal["same", "cpu"]  # the frozen reference beside the policy, or CPU

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if (self.generation_batch_size is not None
                and self.generation_batch_size % self.num_generations):
            return [("generation_batch_size",
                     f"{self.generation_batch_size} is not a multiple of num_generations "
                     f"({self.num_generations}): a forward pass samples whole prompt groups")]
        return []


@dataclass(frozen=True, kw_only=True)
class ReinforceParams(PolicyGradientParams, HeldoutReportParams):
    reward: Literal["reward_model", "gold"]
    length_penalty: float = param(NON_NEGATIVE_NUMBER)  # weight, per token


@dataclass(frozen=True, kw_only=True)
class TaskSftParams:
    base: str  # pretrain, hf:<name> or a model directory
    kind: Literal["add", "reverse", "gsm8k"]
    # gsm8k: hf:openai/gsm8k:main or file:<dir> with train.jsonl and test.jsonl (question,
    # answer ending in "#### <number>"); the generated kinds ignore it
    source: str | None
    chat: bool  # prompts are a user turn of the tokenizer's chat template (llmpipe.chat)
    digits: int = param(Check("an integer from 1 to 4", lambda v: 1 <= v <= 4))
    train_problems: int = param(POSITIVE_INT)
    test_problems: int = param(POSITIVE_INT)
    pass_k: int = param(Check("an integer of at least 2", lambda v: v >= 2))
    max_steps: int = param(POSITIVE_INT)
    batch_size: int = param(POSITIVE_INT)
    learning_rate: float = param(POSITIVE_NUMBER)
    warmup_steps: int = param(NON_NEGATIVE_INT)
    gradient_checkpointing: bool  # less activation memory, ~30% more compute

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.kind == "add" and self.digits > 3:  # 81M pairs to enumerate and hash
            return [("digits", f"{self.digits} is more than add's 3")]
        if self.kind == "gsm8k" and self.source is None:
            return [("source", "missing: gsm8k reads its problems from a source "
                               "(hf:openai/gsm8k:main, or file:<dir> with train.jsonl and "
                               "test.jsonl)")]
        return []


@dataclass(frozen=True, kw_only=True)
class TaskReinforceParams(PolicyGradientParams):
    pass


@dataclass(frozen=True, kw_only=True)
class TaskGrpoParams(GrpoTrainingParams):
    pass


@dataclass(frozen=True, kw_only=True)
class EvaluateParams:
    block_size: int = param(POSITIVE_INT)
    eval_windows: int = param(POSITIVE_INT)  # per corpus, the same for every model
    batch_size: int = param(POSITIVE_INT)
    samples_per_prompt: int = param(POSITIVE_INT)  # on the held-out preference prompts
    completion_tokens: int = param(POSITIVE_INT)
    temperature: float = param(POSITIVE_NUMBER)
    generate_tokens: int = param(POSITIVE_INT)  # timed greedy generation
    repeats: int = param(POSITIVE_INT)
    sample: SampleParams  # fixed prompts whose generations go into the report
    # lm-evaluation-harness tasks run on every model (llmpipe.harness; null: none), each on at
    # most harness_limit items (null: all)
    harness_tasks: list[str] | None
    harness_limit: int | None = param(POSITIVE_INT)


@dataclass(frozen=True, kw_only=True)
class SharedParams:
    seed: int = param(NON_NEGATIVE_INT)


STAGE_SCHEMAS: dict[str, type] = {
    "download": DownloadParams,
    "tokenize": TokenizeParams,
    "pretrain": PretrainParams,
    "finetune": FinetuneParams,
    "lora": LoraParams,
    "quantize": QuantizeParams,
    "preferences": PreferencesParams,
    "reward_model": RewardModelParams,
    "grpo": GrpoParams,
    "reinforce": ReinforceParams,
    "task_sft": TaskSftParams,
    "task_reinforce": TaskReinforceParams,
    "task_grpo": TaskGrpoParams,
    "evaluate": EvaluateParams,
}
# Stages whose dvc.yaml command is `${<stage>.launcher} -m stages.<stage>`.
LAUNCHED_STAGES = tuple(stage for stage, schema in STAGE_SCHEMAS.items()
                        if "launcher" in {f.name for f in dataclasses.fields(schema)})
STAGE_OF_SCHEMA: dict[type, str] = {schema: stage for stage, schema in STAGE_SCHEMAS.items()}
SHARED_KEYS = tuple(f.name for f in dataclasses.fields(SharedParams))
Schema = TypeVar("Schema")


# --- validation ------------------------------------------------------------------------------


def _kind_of(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, check: Check | None) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arg in (a for a in get_args(tp) if a is not type(None)):
            try:
                return _convert(value, arg, key, check)
            except ParamsError as e:
                last_error = e
        raise last_error
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ParamsError(f"{key}: {value!r} is not one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{key}: {value!r} is not a non-empty list")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", check) for i, v in enumerate(value)]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
        ok = ok and math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported type in params schema at {key}: {tp}")
    if not ok:
        raise ParamsError(f"{key}: {value!r} is not {check.allowed if check else _kind_of(tp)}")
    if check is not None and not check.predicate(value):
        raise ParamsError(f"{key}: {value!r} is not {check.allowed}")
    return value


def build(schema: type, raw: Any, prefix: str) -> Any:
    """Build the dataclass `schema` from the mapping `raw` found at dotted key `prefix`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix}: {raw!r} is not a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ParamsError(f"{prefix}.{key}: unknown key (allowed: {allowed})")
    hints = get_type_hints(schema)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in raw:
            raise ParamsError(f"{key}: missing (required)")
        values[name] = _convert(raw[name], hints[name], key, f.metadata.get("check"))
    built = schema(**values)
    for name, problem in getattr(built, "cross_field_problems", list)():
        raise ParamsError(f"{prefix}.{name}: {problem}")
    return built


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    # ruamel (YAML 1.2, as DVC reads it): PyYAML would read `lr: 3e-4` as a string.
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    try:
        raw = YAML(typ="safe").load(path.read_text())
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections")
    _check_sections(raw)
    return raw


def _check_sections(raw: dict[str, Any]) -> None:
    known = set(STAGE_SCHEMAS) | set(SHARED_KEYS)
    for key in raw:
        if key not in known:
            raise ParamsError(f"{key}: unknown key (allowed: {', '.join(sorted(known))})")


def load_stage_params(schema: type[Schema], path: str | Path = PARAMS_FILE
                      ) -> tuple[SharedParams, Schema]:
    """The shared keys and the validated section of the stage whose schema is `schema`
    (e.g. FinetuneParams); other sections are not read."""
    if schema not in STAGE_OF_SCHEMA:
        raise TypeError(f"{schema.__name__} is no stage's schema (see STAGE_SCHEMAS)")
    stage = STAGE_OF_SCHEMA[schema]
    raw = read_params_file(path)
    if stage not in raw:
        raise ParamsError(f"{stage}: missing section in {path}")
    return shared_params(raw), build(STAGE_SCHEMAS[stage], raw[stage], stage)


def shared_params(raw: dict[str, Any]) -> SharedParams:
    values = {k: raw[k] for k in SHARED_KEYS if k in raw}
    for k in SHARED_KEYS:
        if k not in values:
            raise ParamsError(f"{k}: missing (required)")
    fields = {f.name: f for f in dataclasses.fields(SharedParams)}
    return SharedParams(**{
        k: _convert(v, get_type_hints(SharedParams)[k], k, fields[k].metadata.get("check"))
        for k, v in values.items()
    })


def validate_all(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Validate every section (for `python -m llmpipe.params` and the tests)."""
    return validate_mapping(read_params_file(path), str(path))


def validate_mapping(raw: dict[str, Any], path: str = "params") -> dict[str, Any]:
    _check_sections(raw)
    validated: dict[str, Any] = {"shared": shared_params(raw)}
    for stage, schema in STAGE_SCHEMAS.items():
        if stage not in raw:
            raise ParamsError(f"{stage}: missing section in {path}")
        validated[stage] = build(schema, raw[stage], stage)
    return validated


if __name__ == "__main__":
    import sys

    from llmpipe.stage import run_main

    run_main(lambda: (validate_all(sys.argv[1] if len(sys.argv) > 1 else PARAMS_FILE),
                      print("params OK")))
