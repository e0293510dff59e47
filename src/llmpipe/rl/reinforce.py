"""REINFORCE for a language model, written out: the policy-gradient fine-tuning that TRL's GRPO
builds on, in plain PyTorch, to read top to bottom.

One step:
1. sample k completions for each of `prompts_per_step` prompts from the policy (temperature,
   no top-k: the distribution the gradient is taken under);
2. score them (weighted reward functions with TRL's signature: a reward model, the gold scorer,
   an exact-match checker, a length penalty) and subtract `beta` x the completion's KL to the
   reference policy (sum over its tokens of log pi - log pi_ref: the KL-shaped reward of
   Ziegler et al. 2019, detached);
3. subtract a baseline per prompt group: `rloo`, the mean of the other k-1 completions'
   rewards (leave-one-out, Kool et al. 2019; Ahmadian et al. 2024), or `group_mean`, the mean
   of all k (GRPO's, without its division by the standard deviation);
4. loss = -advantage x log pi(completion), normalised per `token` (summed over every completion
   token of the batch, divided by their count) or per `sequence` (each completion's mean over
   its tokens, then the mean over completions); clip the gradient norm; an AdamW step, its
   learning rate constant or decaying linearly to 0 over the steps (`lr_schedule`).

A completion's tokens run up to and including its end-of-text token: stopping is an action.

On a GPU: the policy's trainable weights are kept in float32 (runtime.fp32_master_weights) and
`dtype: bfloat16` computes under bf16 autocast (sampling, log-probs, the reference, which is held
in bf16); `generation_batch_size` samples and scores a step in passes of that many completions,
the gradient accumulating over them; `reference_device: cpu` keeps the reference off the GPU.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch.nn import functional as F

from llmpipe.data.chat import PLAIN, PromptFormat
from llmpipe.rl.sampling import Sampling, generate
from llmpipe.runtime import compute_autocast, fp32_master_weights, frozen_reference

# A reward function, TRL's signature: prompts, completions (texts), completion ids and each
# dataset column as keyword lists -> one float per completion.
RewardFunction = Callable[..., list[float]]


@dataclass(frozen=True)
class ReinforceConfig:
    num_generations: int  # k completions per prompt
    prompts_per_step: int
    max_steps: int
    learning_rate: float
    max_completion_length: int
    temperature: float
    baseline: str  # rloo | group_mean
    loss_normalisation: str  # token | sequence
    beta: float  # weight of the KL to the reference, subtracted from the reward
    grad_clip: float
    lr_schedule: str = "constant"  # constant | linear (to 0 at max_steps, as TRL's "linear")
    # Where and how it computes; the defaults are a one-process CPU run's.
    dtype: str = "float32"  # float32 | bfloat16 (autocast over float32 master weights)
    generation_batch_size: int | None = None  # completions per forward pass; None: the step's
    reference_device: str = "same"  # same (as the policy) | cpu


def config_from(p) -> ReinforceConfig:
    """The loop's settings from a params section that has them (ReinforceParams)."""
    return ReinforceConfig(**{f.name: getattr(p, f.name) for f in fields(ReinforceConfig)})


def rloo_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (groups, k) -> for each completion, the mean reward of the other k-1 in its group."""
    k = rewards.size(1)
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def group_mean_baseline(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.mean(dim=1, keepdim=True).expand_as(rewards)


BASELINES = {"rloo": rloo_baseline, "group_mean": group_mean_baseline}


def zero_std_share(rewards: torch.Tensor, k: int) -> float:
    """The share of prompt groups whose k completions all scored alike: their advantages are 0,
    so they give no gradient (TRL's GRPO logs it as frac_reward_zero_std)."""
    return (rewards.view(-1, k).std(dim=1) == 0).float().mean().item()


@dataclass
class Rollout:
    """k completions for each prompt of a batch, padded: prompts on the left, completions on
    the right; `completion_mask` marks the completion tokens (end-of-text included)."""

    ids: torch.Tensor  # (n, prompt + completion)
    attention_mask: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor  # (n, completion)
    texts: list[str]
    completion_ids: list[list[int]]  # without padding, end-of-text included when generated

    def to(self, device) -> Rollout:
        return replace(
            self,
            ids=self.ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
        )


@torch.no_grad()
def sample(
    policy,
    tokenizer,
    prompts: Sequence[str],
    k: int,
    max_new_tokens: int,
    temperature: float,
    prompt_format: PromptFormat = PLAIN,
) -> Rollout:
    policy.eval()
    # seed=0 is unused: the loop seeds once, and each step draws from where the last one left off.
    batch, ids = generate(
        policy,
        tokenizer,
        [prompt_format.prompt_ids(tokenizer, q) for q in prompts],
        Sampling(k, max_new_tokens, temperature, seed=0),
    )
    prompt_length = batch["input_ids"].size(1)
    completion = ids[:, prompt_length:]
    is_eos = completion == tokenizer.eos_token_id
    # Tokens after the first end-of-text are padding (generate pads finished rows with it).
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = ~after_eos
    lengths = completion_mask.sum(dim=1).tolist()
    completion_ids = [row[:n] for row, n in zip(completion.tolist(), lengths, strict=True)]
    texts = tokenizer.batch_decode(
        [[t for t in row if t != tokenizer.eos_token_id] for row in completion_ids],
        skip_special_tokens=True,
    )
    attention_mask = torch.cat(
        [batch["attention_mask"].repeat_interleave(k, dim=0), completion_mask.long()], dim=1
    )
    return Rollout(ids, attention_mask, prompt_length, completion_mask, texts, completion_ids)


def token_logprobs(
    model, rollout: Rollout, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) of every completion token (n, completion) at the sampling temperature, and
    the entropy of pi at each of those positions (detached)."""
    # Positions count real tokens only, as generate counted them under left padding.
    position_ids = (rollout.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=rollout.ids, attention_mask=rollout.attention_mask, position_ids=position_ids
    ).logits
    logits = logits[:, rollout.prompt_length - 1 : -1].float() / temperature
    logprobs = F.log_softmax(logits, dim=-1)
    targets = rollout.ids[:, rollout.prompt_length :]
    chosen = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return chosen, entropy


def policy_gradient_loss(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, normalisation: str
) -> torch.Tensor:
    """-advantage x log pi over the completion tokens: logprobs and mask (n, T), advantages
    (n,)."""
    per_token = -advantages.unsqueeze(1) * logprobs * mask
    if normalisation == "token":
        return per_token.sum() / mask.sum().clamp(min=1)
    return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def total_reward(
    rewards: Sequence[tuple[RewardFunction, float]],
    prompts: list[str],
    rollouts: Sequence[Rollout],
    columns: dict[str, list],
) -> torch.Tensor:
    """The weighted sum of the reward functions, one value per completion (the rollouts' in
    order)."""
    texts = [t for r in rollouts for t in r.texts]
    completion_ids = [ids for r in rollouts for ids in r.completion_ids]
    total = torch.zeros(len(texts))
    for function, weight in rewards:
        total += weight * torch.tensor(
            function(prompts=prompts, completions=texts, completion_ids=completion_ids, **columns),
            dtype=torch.float32,
        )
    return total


def sample_step(
    policy,
    tokenizer,
    prompts: Sequence[str],
    cfg: ReinforceConfig,
    prompt_format: PromptFormat = PLAIN,
) -> list[Rollout]:
    """A step's k completions per prompt, in passes of cfg.generation_batch_size completions
    (whole prompt groups; one pass when None). Sampling draws from one random stream over the
    passes, so the same seed samples other completions at another pass size: the figures of a
    run depend on it through the sampling alone."""
    k = cfg.num_generations
    per_pass = (
        len(prompts)
        if cfg.generation_batch_size is None
        else max(1, cfg.generation_batch_size // k)
    )
    device = next(policy.parameters()).device
    with compute_autocast(device, cfg.dtype):
        return [
            sample(
                policy,
                tokenizer,
                prompts[i : i + per_pass],
                k,
                cfg.max_completion_length,
                cfg.temperature,
                prompt_format,
            )
            for i in range(0, len(prompts), per_pass)
        ]


@torch.no_grad()
def reference_kl(
    reference, rollout: Rollout, logprobs: torch.Tensor, cfg: ReinforceConfig
) -> torch.Tensor:
    """Each completion's KL to the reference (sum over its tokens of log pi - log pi_ref), on
    the CPU; the reference computes on its own device and its log-probs come over."""
    device = next(reference.parameters()).device
    with compute_autocast(device, cfg.dtype):
        reference_logprobs, _ = token_logprobs(reference, rollout.to(device), cfg.temperature)
    mask = rollout.completion_mask.float()
    return ((logprobs.detach() - reference_logprobs.to(logprobs.device)) * mask).sum(dim=1).cpu()


def backward_step(
    policy, reference, rollouts: Sequence[Rollout], reward: torch.Tensor, cfg: ReinforceConfig
) -> dict[str, float]:
    """Shape the rewards with the KL, subtract the baselines and backpropagate the loss of one
    step's rollouts into the policy's gradients; returns the step's figures.

    One rollout: one forward pass gives the log-probs of the KL and of the loss. Several: each
    pass is backpropagated at once and its graph freed (the memory of one pass), the gradients
    accumulating to the whole step's; the KL, which every advantage needs first, then comes from
    a pass without gradients (when beta > 0; else from the passes themselves). The loss is
    normalised over the whole step either way, so the pass size changes the gradient only by
    rounding."""
    device = next(policy.parameters()).device
    masks = [r.completion_mask.float() for r in rollouts]
    kept = None  # (log-probs, entropy) whose graph the loss backpropagates through
    with compute_autocast(device, cfg.dtype):
        if len(rollouts) == 1:
            kept = token_logprobs(policy, rollouts[0], cfg.temperature)
            kl_logprobs = [kept[0]]
        elif cfg.beta > 0:
            with torch.no_grad():
                kl_logprobs = [token_logprobs(policy, r, cfg.temperature)[0] for r in rollouts]
        else:
            kl_logprobs = None  # the KL (a figure only) from each pass below
    kl = (
        torch.cat(
            [
                reference_kl(reference, r, lp, cfg)
                for r, lp in zip(rollouts, kl_logprobs, strict=True)
            ]
        )
        if reference is not None and kl_logprobs is not None
        else None
    )
    if cfg.beta > 0 and kl is None:
        raise ValueError("beta > 0 needs a reference model")
    shaped = reward - cfg.beta * kl if kl is not None else reward
    groups = shaped.view(-1, cfg.num_generations)
    baseline = BASELINES[cfg.baseline](groups)
    advantages = (groups - baseline).reshape(-1).to(device)

    if kept is not None:
        logprobs, entropy = kept
        loss = policy_gradient_loss(logprobs, advantages, masks[0], cfg.loss_normalisation)
        loss.backward()
        loss_value = loss.item()
        entropy_sum = (entropy * masks[0]).sum()
    else:
        tokens = sum(m.sum() for m in masks)
        # Each pass's share of the whole step's loss: its summed terms over the step's tokens
        # (token) or its completions' means over the step's completions (sequence).
        denominator = tokens.clamp(min=1) if cfg.loss_normalisation == "token" else len(reward)
        loss_value, entropy_sum, kl_parts = 0.0, torch.zeros((), device=device), []
        per_pass = advantages.split([len(r.texts) for r in rollouts])
        for rollout, mask, adv in zip(rollouts, masks, per_pass, strict=True):
            with compute_autocast(device, cfg.dtype):
                logprobs, entropy = token_logprobs(policy, rollout, cfg.temperature)
            per_token = -adv.unsqueeze(1) * logprobs * mask
            part = (
                per_token.sum()
                if cfg.loss_normalisation == "token"
                else (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
            )
            part = part / denominator
            part.backward()
            loss_value += part.item()
            entropy_sum += (entropy * mask).sum()
            if kl is None and reference is not None:
                kl_parts.append(reference_kl(reference, rollout, logprobs, cfg))
        if kl_parts:
            kl = torch.cat(kl_parts)
    lengths = torch.cat([m.sum(dim=1) for m in masks])
    figures = {
        "reward": reward.mean().item(),
        "frac_reward_zero_std": zero_std_share(reward, cfg.num_generations),
        "baseline": baseline.mean().item(),
        "advantage_std": advantages.std().item(),
        "entropy": (entropy_sum / lengths.sum().clamp(min=1)).item(),
    }
    if kl is not None:  # no reference (beta 0): no KL to show
        figures["kl"] = kl.mean().item()
    return {**figures, "completion_length": lengths.mean().item(), "loss": loss_value}


def reinforce(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[dict],
    rewards: Sequence[tuple[RewardFunction, float]],
    cfg: ReinforceConfig,
    seed: int,
    prompt_format: PromptFormat = PLAIN,
    log: Callable[[int, dict], None] = lambda step, stats: None,
    on_step: Callable[[int], None] = lambda step: None,
) -> int:
    """Train `policy` in place on `prompts` (dicts with a "prompt" and any columns the reward
    functions take, e.g. "answer"): its trainable weights become float32 where they were bf16
    or fp16. `reference` is frozen and placed in place (cfg.dtype, cfg.reference_device); None
    when beta is 0 (then no KL is logged). Returns the steps done."""
    if cfg.beta > 0 and reference is None:
        raise ValueError("beta > 0 needs a reference model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fp32_master_weights(policy)
    device = next(policy.parameters()).device
    if reference is not None:
        frozen_reference(reference, cfg.dtype).to(
            "cpu" if cfg.reference_device == "cpu" else device
        )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    # Step s (from 0) takes the rate x (1 - s / max_steps), as transformers' linear schedule
    # without warmup: the first step the whole rate, none left after the last.
    decay = cfg.lr_schedule == "linear"
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 - s / cfg.max_steps if decay else 1.0
    )
    order_rng = random.Random(seed)  # which prompts each step sees: shuffled passes
    torch.manual_seed(seed)  # the sampling
    order: list[int] = []
    for step in range(1, cfg.max_steps + 1):
        started = time.perf_counter()
        while len(order) < cfg.prompts_per_step:
            order += order_rng.sample(range(len(prompts)), len(prompts))
        batch = [prompts[i] for i in order[: cfg.prompts_per_step]]
        del order[: cfg.prompts_per_step]

        rollouts = sample_step(policy, tokenizer, [b["prompt"] for b in batch], cfg, prompt_format)
        repeated = [b for b in batch for _ in range(cfg.num_generations)]
        columns = {key: [b[key] for b in repeated] for key in repeated[0] if key != "prompt"}
        reward = total_reward(rewards, [b["prompt"] for b in repeated], rollouts, columns)

        # The policy stays in eval mode: dropout would make log pi noise (TRL turns it off
        # too); gradients flow all the same.
        optimizer.zero_grad(set_to_none=True)
        figures = backward_step(policy, reference, rollouts, reward, cfg)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        learning_rate = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()

        log(
            step,
            {
                **figures,
                "grad_norm": grad_norm.item(),
                "learning_rate": learning_rate,
                "step_time": time.perf_counter() - started,
            },
        )
        on_step(step)
    return cfg.max_steps
