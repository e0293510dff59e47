"""The params schema of the RL stages (preferences, reward_model, grpo, reinforce).

The rules every schema follows, and the shared keys: llmpipe.params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from llmpipe.params import (
    GOLD_SCORER,
    NON_NEGATIVE_INT,
    NON_NEGATIVE_NUMBER,
    OPEN_UNIT_INTERVAL,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    PREFERENCE_SOURCE,
    Check,
    param,
)


@dataclass(frozen=True, kw_only=True)
class PreferencesParams:
    SECTION: ClassVar[str] = "preferences"
    source: str = param(PREFERENCE_SOURCE)
    gold_scorer: str = param(GOLD_SCORER)
    gold_label: str | None  # the label to reward, for a classifier gold scorer
    # minus this weight x the share of repeated word trigrams (llmpipe.rl.gold): loops don't pay
    gold_repetition_penalty: float = param(NON_NEGATIVE_NUMBER)
    # vader: its words used in more than this share of the finetune corpus's train paragraphs
    # are the domain's vocabulary and score 0 (llmpipe.rl.gold.domain_words); null: none
    gold_domain_share: float | None = param(OPEN_UNIT_INTERVAL)
    split: str  # hf:/file: sets
    heldout_fraction: float = param(OPEN_UNIT_INTERVAL)  # hf:/file: sets
    # hf:/file: sets: the columns holding the prompt and the two completions (plain text)
    prompt_column: str
    chosen_column: str
    rejected_column: str
    # prompts are a user turn of the tokenizer's chat template (an instruct model), for every
    # stage that reads the preference set (llmpipe.data.chat)
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
            return [
                (
                    "pairs_per_prompt",
                    f"{self.pairs_per_prompt} needs at least "
                    f"{2 * self.pairs_per_prompt} samples_per_prompt",
                )
            ]
        return []


@dataclass(frozen=True, kw_only=True)
class RewardModelParams:
    SECTION: ClassVar[str] = "reward_model"
    learning_rate: float = param(POSITIVE_NUMBER)
    warmup_steps: int = param(NON_NEGATIVE_INT)
    epochs: int = param(POSITIVE_INT)
    batch_size: int = param(POSITIVE_INT)  # pairs per step, over all processes
    max_length: int = param(POSITIVE_INT)  # tokens of prompt + completion


# The learning rate over the steps: constant, or a linear decay to 0 at max_steps (TRL's
# default). The two algorithms of a pair take the same, so that a difference is the algorithm's.
LrSchedule = Literal["constant", "linear"]
AT_LEAST_TWO = Check("an integer of at least 2 (a group)", lambda v: v >= 2)


@dataclass(frozen=True, kw_only=True)
class GrpoTrainingParams:
    """How TRL's GRPO trains (grpo, task_grpo)."""

    # The processes it runs on: in the hash, as GRPO's completions depend on it (TRL seeds each
    # process apart); every executor starts this many (llmpipe.launch.executors).
    processes: int = param(POSITIVE_INT)
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
    lr_schedule: LrSchedule
    max_completion_length: int = param(POSITIVE_INT)
    temperature: float = param(POSITIVE_NUMBER)
    max_steps: int = param(POSITIVE_INT)


@dataclass(frozen=True, kw_only=True)
class RlBaselineParams:
    """How grpo and reinforce are measured on the held-out prompts: the policy they both start
    from once (rl_baseline), each trained policy after, with these settings and the same
    sampling seed."""

    SECTION: ClassVar[str] = "rl_baseline"
    eval_samples: int = param(POSITIVE_INT)  # completions per held-out prompt
    max_completion_length: int = param(POSITIVE_INT)
    temperature: float = param(POSITIVE_NUMBER)
    # The compute dtype of every measurement (bfloat16: autocast, the reference held in bf16);
    # reinforce's dtype must be the same, as its reference is the judges'.
    dtype: Literal["float32", "bfloat16"]


@dataclass(frozen=True, kw_only=True)
class HeldoutReportParams:
    """What an RLHF stage adds to the held-out measurement of rl_baseline (grpo, reinforce)."""

    # What it is rewarded by: the reward model, or the gold scorer that judges it (then the
    # gold gain is no test)
    reward: Literal["reward_model", "gold"]
    length_penalty: float = param(NON_NEGATIVE_NUMBER)  # weight, per token

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
    SECTION: ClassVar[str] = "grpo"


@dataclass(frozen=True, kw_only=True)
class PolicyGradientParams:
    """llmpipe.rl.reinforce's loop (reinforce, task_reinforce)."""

    num_generations: int = param(AT_LEAST_TWO)  # k completions per prompt
    prompts_per_step: int = param(POSITIVE_INT)
    max_steps: int = param(POSITIVE_INT)
    learning_rate: float = param(POSITIVE_NUMBER)
    lr_schedule: LrSchedule
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
        if (
            self.generation_batch_size is not None
            and self.generation_batch_size % self.num_generations
        ):
            return [
                (
                    "generation_batch_size",
                    f"{self.generation_batch_size} is not a multiple of num_generations "
                    f"({self.num_generations}): a forward pass samples whole prompt groups",
                )
            ]
        return []


@dataclass(frozen=True, kw_only=True)
class ReinforceParams(PolicyGradientParams, HeldoutReportParams):
    SECTION: ClassVar[str] = "reinforce"
