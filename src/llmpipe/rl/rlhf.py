"""RLHF with TRL: a reward model trained on preference pairs, then GRPO against it.

Both trainers' defaults that changed across TRL versions (and default bf16 and gradient
checkpointing on, even on CPU) are set explicitly here or from params.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from llmpipe import layout
from llmpipe.data.chat import TEMPLATE_KWARGS, PromptFormat, message_text, right_padded
from llmpipe.errors import ParamsError
from llmpipe.model.loading import load_reward_model, load_tokenizer
from llmpipe.rl.degeneration import distinct_n, repeated_ngram_share
from llmpipe.rl.gold import GoldScorer
from llmpipe.rl.params import GrpoParams, GrpoTrainingParams, RewardModelParams
from llmpipe.rl.preferences import read_gold_spec
from llmpipe.rl.sampling import Sampling, sample_completions
from llmpipe.runtime import per_process, runtime_args, trained_model
from llmpipe.train.lora import adapter_config
from llmpipe.train.tracking import log_step


@dataclass(frozen=True)
class Judges:
    """What a policy's held-out completions are scored by: the gold scorer the preferences were
    labelled with, the trained reward model, and the reference policy (for KL)."""

    gold: GoldScorer
    reward_model: torch.nn.Module
    reward_tokenizer: object
    reference: torch.nn.Module
    prompt_format: PromptFormat  # the preference set's: how prompts are sampled and scored

    def reward_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return reward_scores(
            self.reward_model, self.reward_tokenizer, self.prompt_format, prompts, completions
        )


def load_judges(preferences_dir: Path, reward_dir: Path, reference) -> Judges:
    reward_tokenizer = load_tokenizer(reward_dir)
    return Judges(
        read_gold_spec(preferences_dir).load(),
        load_reward_model(reward_dir, reward_tokenizer),
        reward_tokenizer,
        reference,
        PromptFormat.read(preferences_dir),
    )


@torch.no_grad()
def reward_scores(
    model,
    tokenizer,
    prompt_format: PromptFormat,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 64,
) -> list[float]:
    """The reward model's score of each prompt + completion, read from the tokens it was
    trained on (`PromptFormat.scored_ids`)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [
        prompt_format.scored_ids(tokenizer, q, c) for q, c in zip(prompts, completions, strict=True)
    ]
    scores: list[float] = []
    for i in range(0, len(rows), batch_size):
        inputs = right_padded(rows[i : i + batch_size], tokenizer.pad_token_id, device)
        scores += model(**inputs).logits[:, 0].float().tolist()
    return scores


def pairwise_report(model, tokenizer, prompt_format: PromptFormat, pairs: Sequence[dict]) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin on preference pairs."""
    prompts = [p["prompt"] for p in pairs]
    chosen = reward_scores(model, tokenizer, prompt_format, prompts, [p["chosen"] for p in pairs])
    rejected = reward_scores(
        model, tokenizer, prompt_format, prompts, [p["rejected"] for p in pairs]
    )
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
    }


def gold_agreement(
    model, tokenizer, prompt_format: PromptFormat, fresh: Sequence[dict]
) -> tuple[float, int]:
    """How often the reward model orders two fresh completions as the gold scorer does
    (pairs the gold scorer ties are left out); returns (agreement, pairs counted)."""
    rows = [r for r in fresh if r["gold"][0] != r["gold"][1]]
    prompts = [r["prompt"] for r in rows]
    a, b = (
        reward_scores(model, tokenizer, prompt_format, prompts, [r["completions"][i] for r in rows])
        for i in (0, 1)
    )
    agree = sum(
        (x > y) == (r["gold"][0] > r["gold"][1]) for x, y, r in zip(a, b, rows, strict=True)
    )
    return agree / max(len(rows), 1), len(rows)


def train_reward_model(
    policy_dir: Path,
    train_pairs: Sequence[dict],
    eval_pairs: Sequence[dict],
    prompt_format: PromptFormat,
    p: RewardModelParams,
    seed: int,
    live_dir: Path,
):
    """Returns (model (None outside the main process), tokenizer, pairs trained on:
    RewardTrainer drops pairs over max_length). The pairs go in tokenized as `reward_scores`
    reads them (`PromptFormat.scored_ids`), not as RewardTrainer would tokenize them."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from llmpipe.train.callbacks import TrainerCurves

    set_seed(seed)  # the new score head is initialised from the seed
    tokenizer = load_tokenizer(policy_dir)
    model = load_reward_model(policy_dir, tokenizer)
    work_dir = tempfile.mkdtemp(prefix="llmpipe-reward-")
    args = RewardConfig(
        output_dir=work_dir,
        num_train_epochs=p.epochs,
        per_device_train_batch_size=per_process(p.batch_size, "reward_model.batch_size"),
        per_device_eval_batch_size=per_process(p.batch_size, "reward_model.batch_size"),
        learning_rate=p.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=p.warmup_steps,
        max_length=p.max_length,  # longer pairs would be dropped, not truncated
        gradient_checkpointing=False,  # defaults on; pointless for small models
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=5,
        **runtime_args(seed),
    )

    def tokenized(pairs):
        return Dataset.from_list(
            [
                {
                    f"{side}_ids": prompt_format.scored_ids(tokenizer, q["prompt"], q[side])
                    for side in ("chosen", "rejected")
                }
                for q in pairs
            ]
        )

    try:
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=tokenized(train_pairs),
            eval_dataset=tokenized(eval_pairs),
            processing_class=tokenizer,
            callbacks=[TrainerCurves(live_dir)],
        )
        trainer.train()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    model = trained_model(trainer, lambda: load_reward_model(policy_dir, tokenizer))
    return model, tokenizer, len(trainer.train_dataset)


def length_penalty(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """A shaping reward (TRL's reward-function signature): minus the completion's length in
    tokens; its weight in params sets the strength."""
    return [-float(len(ids)) for ids in completion_ids]


def rlhf_rewards(
    reward: str, judges: Judges, length_penalty_weight: float
) -> list[tuple[Callable[..., list[float]], float]]:
    """(reward function with TRL's signature, weight) for llmpipe.rl.reinforce: the reward model
    on prompt + completion (as TRL scores it) or the gold scorer on the completion, and the
    length penalty."""
    if reward == "reward_model":

        def score(prompts, completions, **kwargs):
            return judges.reward_scores(prompts, completions)
    else:

        def score(prompts, completions, **kwargs):
            return judges.gold(completions)

    rewards = [(score, 1.0)]
    if length_penalty_weight > 0:
        rewards.append((length_penalty, length_penalty_weight))
    return rewards


def finish_rl_stage(
    stage: str,
    directory: Path,
    policy,
    tokenizer,
    before: dict,
    after: dict,
    p,
    steps: int,
    heldout_prompts: int,
    wall_s: float,
) -> dict:
    """The end of an RLHF stage (grpo, reinforce): save the policy with its samples before and
    after, write the before/after metrics with the flags, and say what changed."""
    from llmpipe.io import atomic_dir, write_json, write_metrics

    with atomic_dir(directory) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "samples.json", {"before": before["samples"], "after": after["samples"]})
    metrics = {
        **before_after_metrics(
            before, after, p.degeneration_distinct_drop, p.degeneration_fluency_rise
        ),
        "steps": steps,
        "heldout_prompts": heldout_prompts,
        "completions_sampled": steps * p.prompts_per_step * p.num_generations,
        "perf": {"wall_s": wall_s},
    }
    write_metrics(stage, metrics)
    print(
        f"held-out gold score {before['gold_score']:.3f} -> {after['gold_score']:.3f}, reward "
        f"model {before['reward_model_score']:.3f} -> {after['reward_model_score']:.3f}, KL "
        f"{after['kl_to_reference']:.3f} -> {directory}"
    )
    if metrics["reward_hacking_suspected"]:
        print("warning: the reward model's score rose but the gold score did not: reward hacking")
    if metrics["degeneration_suspected"]:
        print(
            f"warning: the gold score rose while the text degenerated: distinct bigrams "
            f"{metrics['distinct_2_change']:+.0%}, the SFT model's loss on the completions "
            f"{metrics['reference_loss_change']:+.2f} nats/token (the judges like what is no "
            "longer text; see the samples)"
        )
    return metrics


def reward_functions(
    reward_dir: Path, prompt_format: PromptFormat, p: GrpoParams
) -> list[tuple[Callable[..., list[float]], float]]:
    """(reward function, weight) for GRPO: the reward model, scoring what it was trained on
    (TRL's own scoring of a reward model drops the BOS its trainer added), plus shaping."""
    reward_tokenizer = load_tokenizer(reward_dir)
    model = load_reward_model(reward_dir, reward_tokenizer)

    def reward_model(prompts, completions, **kwargs):
        return reward_scores(
            model,
            reward_tokenizer,
            prompt_format,
            [message_text(q) for q in prompts],
            [message_text(c) for c in completions],
        )

    rewards = [(reward_model, 1.0)]
    if p.length_penalty > 0:
        rewards.append((length_penalty, p.length_penalty))
    return rewards


# What the over-optimisation curve follows over an RL run (curves_dir(stage)/heldout/<key>.tsv).


class HeldoutCurve:
    """The over-optimisation curve (Gao, Schulman and Hilton 2022): the policy's gold score,
    reward-model score and KL to the reference on a few held-out prompts, at step 0 and every
    `interval` steps (0: never), logged beside the training curves as heldout/<figure>. Where
    gold stops following the proxy as KL grows is the number to read. The random state is
    restored afterwards, so training draws what it would draw without the curve."""

    def __init__(self, report: Callable[[torch.nn.Module], dict], interval: int, live=None):
        self.report, self.interval, self.live = report, interval, live

    def measure(self, model, step: int) -> None:
        if self.live is None or not self.interval or step % self.interval:
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            was_training = model.training
            figures = self.report(model)
            model.train(was_training)
        log_step(self.live, step, {key: figures[key] for key in layout.HELDOUT_CURVES}, "heldout/")

    def log_training(self, step: int, figures: dict[str, float]) -> None:
        log_step(self.live, step, figures)


def run_grpo(
    policy_dir: Path,
    rewards: Sequence[tuple[Callable[..., list[float]], float]],
    prompts: Sequence[str | dict],
    prompt_format: PromptFormat,
    p: GrpoTrainingParams,
    seed: int,
    live_dir: Path,
    heldout_report: Callable[[torch.nn.Module], dict] | None = None,
    curve_interval: int = 0,
):
    """GRPO on the policy against weighted rewards (TRL reward functions: prompts and
    completions are text, or messages under a chat format); returns (policy (merged if LoRA;
    None outside the main process), steps done). `heldout_report` (main process), every
    `curve_interval` steps: the over-optimisation curve."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from llmpipe.train.callbacks import OveroptimisationCurve, TrainerCurves

    completions_per_process = check_grpo_launch(p)
    set_seed(seed)  # LoRA's initial weights come before the Trainer seeds anything
    tokenizer = load_tokenizer(policy_dir)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, use_safetensors=True)
    reward_funcs, weights = (list(x) for x in zip(*rewards, strict=True))
    work_dir = tempfile.mkdtemp(prefix="llmpipe-grpo-")
    args = GRPOConfig(
        output_dir=work_dir,
        max_steps=p.max_steps,
        per_device_train_batch_size=completions_per_process,
        num_generations=p.num_generations,
        use_vllm=p.use_vllm,
        vllm_mode="colocate",  # generation inside the training processes: no server to start
        beta=p.beta,
        loss_type=p.loss_type,
        scale_rewards=p.scale_rewards,
        learning_rate=p.learning_rate,
        max_completion_length=p.max_completion_length,
        temperature=p.temperature,
        top_k=0,  # plain temperature sampling, as the preference pairs were sampled
        disable_dropout=True,  # defaults off: dropout would make the log-ratios noise
        reward_weights=weights,
        chat_template_kwargs=TEMPLATE_KWARGS,  # conversational prompts render as ours do
        gradient_checkpointing=False,  # defaults on
        logging_steps=1,
        save_strategy="no",
        **runtime_args(seed),
    )
    peft_config = (
        adapter_config(
            policy,
            p.lora_r,
            p.lora_alpha,
            0.0,
            p.lora_target_modules,
            f"{_section(p)}.lora_target_modules",
        )
        if p.use_lora
        else None
    )
    callbacks = [curves := TrainerCurves(live_dir)]
    if heldout_report is not None and curve_interval:
        callbacks.append(
            OveroptimisationCurve(curves, HeldoutCurve(heldout_report, curve_interval))
        )
    try:
        rows = [q if isinstance(q, dict) else {"prompt": q} for q in prompts]
        rows = [{**q, "prompt": prompt_format.trl_prompt(q["prompt"])} for q in rows]
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        trainer.train()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    def rebuild():
        from peft import get_peft_model

        fresh = AutoModelForCausalLM.from_pretrained(policy_dir, use_safetensors=True)
        return get_peft_model(fresh, peft_config) if p.use_lora else fresh

    model = trained_model(trainer, rebuild)
    if model is None:  # not the main process
        return None, trainer.state.global_step
    if p.use_lora:
        model = model.merge_and_unload()
    model.config.use_cache = True
    return model, trainer.state.global_step


def check_curve(p: GrpoParams) -> None:
    """The curve generates in the main process alone: a sharded model (FSDP, ZeRO-3) needs every
    process for that, and would wait until the Trainer's ddp_timeout."""
    from llmpipe.runtime import sharded_launch

    if p.curve_interval and sharded_launch():
        raise ParamsError(
            f"{_section(p)}.curve_interval: {p.curve_interval} needs the whole "
            "model in the main process; under an FSDP/DeepSpeed launch set it to 0"
        )


def _section(p) -> str:
    """The params section a GRPO run's settings come from (grpo, task_grpo), for messages."""
    return p.SECTION


def check_grpo_launch(p: GrpoTrainingParams) -> int:
    """What GRPO needs of the machine and the launcher; returns the completions per process.
    Cheap: the stage calls it before its first measurement."""
    check_vllm(p)
    completions = p.prompts_per_step * p.num_generations
    return per_process(
        completions,
        f"{_section(p)}.prompts_per_step",
        f"{p.prompts_per_step} prompts x {p.num_generations} generations = "
        f"{completions} completions",
    )


def check_vllm(p: GrpoTrainingParams) -> None:
    """vLLM generates on CUDA only, and is an optional install."""
    import importlib.util

    if not p.use_vllm:
        return
    if not torch.cuda.is_available():
        raise ParamsError(
            f"{_section(p)}.use_vllm: true needs a CUDA GPU (vLLM generates on "
            "CUDA only; "
            "set it to false to generate with transformers)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ParamsError(
            f"{_section(p)}.use_vllm: true needs vLLM, which is not installed "
            "(pip install -e '.[gpu]')"
        )


@torch.no_grad()
def completion_logprobs(
    model,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    temperature: float = 1.0,
) -> list[float]:
    """Sum of log p(completion token | prefix) per sequence, under the model's distribution
    at the sampling temperature (as TRL computes its log-ratios)."""
    model.eval()
    device = next(model.parameters()).device
    sums = []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        if not completion:
            sums.append(0.0)
            continue
        ids = torch.tensor([prompt + completion], device=device)
        logits = model(ids).logits[0, :-1].float() / (temperature if temperature > 0 else 1.0)
        logprobs = F.log_softmax(logits, dim=-1)
        targets = ids[0, 1:]
        token_lp = logprobs.gather(-1, targets[:, None])[:, 0]
        sums.append(token_lp[len(prompt) - 1 :].sum().item())
    return sums


def policy_report(
    policy, tokenizer, prompts: Sequence[str], sampling: Sampling, judges: Judges
) -> dict:
    """Reward-model score, gold score, KL to the reference (a Monte-Carlo estimate on the
    policy's own samples) and mean length of completions sampled from `policy`."""
    groups = sample_completions(policy, tokenizer, prompts, sampling, judges.prompt_format)
    flat_prompts = [q for q, g in zip(prompts, groups, strict=True) for _ in g]
    completions = [c for g in groups for c in g]
    prompt_ids = [judges.prompt_format.prompt_ids(tokenizer, q) for q in flat_prompts]
    # Stopping is a choice too: a completion that ended includes its end-of-text token.
    completion_ids = [c.ids + [tokenizer.eos_token_id] * c.stopped for c in completions]
    policy_lp = completion_logprobs(policy, prompt_ids, completion_ids, sampling.temperature)
    reference_lp = completion_logprobs(
        judges.reference, prompt_ids, completion_ids, sampling.temperature
    )
    n, every = len(completions), sampling.n
    texts = [c.text for c in completions]
    rm_scores = judges.reward_scores(flat_prompts, texts)
    return {
        "reward_model_score": sum(rm_scores) / n,
        "gold_score": sum(judges.gold(texts)) / n,
        "kl_to_reference": sum(a - b for a, b in zip(policy_lp, reference_lp, strict=True)) / n,
        "completion_length": sum(len(c.ids) for c in completions) / n,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_3gram_share": repeated_ngram_share(texts, 3),
        # fluency: nats per token of the completions under the reference (SFT) policy
        "reference_loss": -sum(reference_lp) / max(sum(len(ids) for ids in completion_ids), 1),
        "samples": [
            {"prompt": q, "completion": c.text}  # one per prompt, of the first four
            for q, c in zip(
                flat_prompts[: every * 4 : every], completions[: every * 4 : every], strict=True
            )
        ],
    }


REPORT_FIGURES = (
    "reward_model_score",
    "gold_score",
    "kl_to_reference",
    "completion_length",
    "distinct_1",
    "distinct_2",
    "repeated_3gram_share",
    "reference_loss",
)


def before_after_metrics(
    before: dict, after: dict, max_distinct_drop: float, max_fluency_rise: float
) -> dict:
    """An RL stage's figures before and after training (policy_report's), the gains, and two
    flags. Reward hacking: the proxy rose while the gold score did not follow. Degeneration: the
    gold score rose while diversity (distinct bigrams fell by more than `max_distinct_drop`, a
    share) or fluency (the reference's loss rose by more than `max_fluency_rise` nats per
    token) collapsed: the judges like what is no longer text."""
    metrics = {
        f"{when}_{key}": report[key]
        for when, report in (("before", before), ("after", after))
        for key in REPORT_FIGURES
    }
    metrics["after_kl_per_token"] = after["kl_to_reference"] / max(after["completion_length"], 1)
    metrics["gold_gain"] = after["gold_score"] - before["gold_score"]
    metrics["reward_model_gain"] = after["reward_model_score"] - before["reward_model_score"]
    metrics["reward_hacking_suspected"] = metrics["reward_model_gain"] > 0 >= metrics["gold_gain"]
    metrics["distinct_2_change"] = after["distinct_2"] / max(before["distinct_2"], 1e-9) - 1
    metrics["reference_loss_change"] = after["reference_loss"] - before["reference_loss"]
    metrics["degeneration_suspected"] = metrics["gold_gain"] > 0 and (
        metrics["distinct_2_change"] < -max_distinct_drop
        or metrics["reference_loss_change"] > max_fluency_rise
    )
    return metrics
