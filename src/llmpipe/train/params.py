"""The params schema of the training stages (pretrain, finetune, lora).

The rules every schema follows, and the shared keys: llmpipe.params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from llmpipe.params import (
    BASE_MODEL,
    HALF_OPEN_UNIT_INTERVAL,
    MODEL_SOURCE,
    NON_NEGATIVE_INT,
    NON_NEGATIVE_NUMBER,
    OPEN_UNIT_INTERVAL,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    SampleParams,
    param,
)


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
class PretrainParams:
    SECTION: ClassVar[str] = "pretrain"
    init: str = param(MODEL_SOURCE)
    model: ModelParams
    batch_size: int = param(POSITIVE_INT)  # per process and micro-step
    grad_accum_steps: int = param(POSITIVE_INT)  # for the whole run, over all processes
    max_steps: int = param(POSITIVE_INT)
    optimizer: Literal["adamw", "muon"]  # muon: Muon for the blocks' matrices, AdamW the rest
    learning_rate: float = param(POSITIVE_NUMBER)
    min_lr: float = param(NON_NEGATIVE_NUMBER)
    warmup_steps: int = param(NON_NEGATIVE_INT)
    schedule: Literal["cosine", "wsd"]  # after the warmup: cosine to min_lr, or warmup-stable-decay
    cooldown_fraction: float = param(OPEN_UNIT_INTERVAL)  # wsd: the last share of steps decaying
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
    peak_flops: float | None = param(POSITIVE_NUMBER)  # None: the GPU's data sheet, or no MFU
    trust_remote_code: bool
    sample: SampleParams | None  # null: no sample generations

    def cross_field_problems(self) -> list[tuple[str, str]]:
        return _schedule_problems(self) + (
            [("min_lr", f"{self.min_lr} is more than learning_rate ({self.learning_rate})")]
            if self.min_lr > self.learning_rate
            else []
        )


def _schedule_problems(p: Any) -> list[tuple[str, str]]:
    problems = []
    if p.warmup_steps >= p.max_steps:
        problems.append(
            ("warmup_steps", f"{p.warmup_steps} is not less than max_steps ({p.max_steps})")
        )
    if p.eval_interval > p.max_steps:
        problems.append(
            (
                "eval_interval",
                f"{p.eval_interval} is more than max_steps "
                f"({p.max_steps}): there would be no evaluation",
            )
        )
    return problems


@dataclass(frozen=True, kw_only=True)
class CausalLMTrainingParams:
    """What finetune and lora share: the base, the data and the optimisation."""

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
    # the train split's last share of tokens (whole documents) that early stopping and the best
    # checkpoint are chosen on: the reported validation windows play no part in the choice
    selection_fraction: float = param(OPEN_UNIT_INTERVAL)
    early_stopping_patience: int = param(POSITIVE_INT)
    # the compute dtype: bfloat16 is autocast over float32 weights (the Trainer's bf16)
    dtype: Literal["float32", "bfloat16"]
    # recompute each layer's activations in the backward pass: less memory, ~30% more compute
    gradient_checkpointing: bool
    trust_remote_code: bool

    def cross_field_problems(self) -> list[tuple[str, str]]:
        return _schedule_problems(self)


@dataclass(frozen=True, kw_only=True)
class FinetuneParams(CausalLMTrainingParams):
    SECTION: ClassVar[str] = "finetune"
    pass


@dataclass(frozen=True, kw_only=True)
class LoraParams(CausalLMTrainingParams):
    SECTION: ClassVar[str] = "lora"
    r: int = param(POSITIVE_INT)
    alpha: int = param(POSITIVE_INT)
    dropout: float = param(HALF_OPEN_UNIT_INTERVAL)
    target_modules: list[str]
