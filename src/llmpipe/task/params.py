"""The params schema of the checkable task's stages (task_sft, task_reinforce, task_grpo).

The rules every schema follows, and the shared keys: llmpipe.params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from llmpipe.params import (
    NON_NEGATIVE_INT,
    NON_NEGATIVE_NUMBER,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Check,
    param,
)
from llmpipe.rl.params import GrpoTrainingParams, PolicyGradientParams


@dataclass(frozen=True, kw_only=True)
class TaskSftParams:
    SECTION: ClassVar[str] = "task_sft"
    base: str  # pretrain, hf:<name> or a model directory
    kind: Literal["add", "add_reversed", "reverse", "gsm8k"]
    # gsm8k: hf:openai/gsm8k:main or file:<dir> with train.jsonl and test.jsonl (question,
    # answer ending in "#### <number>"); the generated kinds ignore it
    source: str | None
    chat: bool  # prompts are a user turn of the tokenizer's chat template (llmpipe.data.chat)
    digits: int = param(Check("an integer from 1 to 4", lambda v: 1 <= v <= 4))
    train_problems: int = param(POSITIVE_INT)
    test_problems: int = param(POSITIVE_INT)
    pass_k: int = param(Check("an integer of at least 2", lambda v: v >= 2))
    # samples per test problem that pass@k is estimated from (at least pass_k; more: less noise)
    pass_samples: int = param(POSITIVE_INT)
    max_steps: int = param(POSITIVE_INT)
    batch_size: int = param(POSITIVE_INT)
    learning_rate: float = param(POSITIVE_NUMBER)
    warmup_steps: int = param(NON_NEGATIVE_INT)
    weight_decay: float = param(NON_NEGATIVE_NUMBER)
    gradient_checkpointing: bool  # less activation memory, ~30% more compute

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.pass_samples < self.pass_k:
            return [("pass_samples", f"{self.pass_samples} is fewer than pass_k {self.pass_k}")]
        if self.kind in ("add", "add_reversed") and self.digits > 3:  # 81M pairs to hash
            return [("digits", f"{self.digits} is more than add's 3")]
        if self.kind == "gsm8k" and self.source is None:
            return [
                (
                    "source",
                    "missing: gsm8k reads its problems from a source "
                    "(hf:openai/gsm8k:main, or file:<dir> with train.jsonl and "
                    "test.jsonl)",
                )
            ]
        return []


# checker: 1 for the exact answer, else 0; random: a control (Shao et al. 2025, "Spurious
# Rewards"): 1 with the SFT model's sampled pass rate on the train problems, whatever the answer
TaskReward = Literal["checker", "random"]


@dataclass(frozen=True, kw_only=True)
class TaskReinforceParams(PolicyGradientParams):
    SECTION: ClassVar[str] = "task_reinforce"
    reward: TaskReward


@dataclass(frozen=True, kw_only=True)
class TaskGrpoParams(GrpoTrainingParams):
    SECTION: ClassVar[str] = "task_grpo"
    reward: TaskReward
