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
   its tokens, then the mean over completions); clip the gradient norm; an AdamW step.

A completion's tokens run up to and including its end-of-text token: stopping is an action.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch.nn import functional as F

from llmpipe.chat import PLAIN, PromptFormat, left_padded

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


@torch.no_grad()
def sample(policy, tokenizer, prompts: Sequence[str], k: int, max_new_tokens: int,
           temperature: float, prompt_format: PromptFormat = PLAIN) -> Rollout:
    device = next(policy.parameters()).device
    batch = left_padded([prompt_format.prompt_ids(tokenizer, q) for q in prompts],
                        tokenizer.pad_token_id, device)
    policy.eval()
    ids = policy.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                          max_new_tokens=max_new_tokens, num_return_sequences=k,
                          pad_token_id=tokenizer.pad_token_id)
    prompt_length = batch["input_ids"].size(1)
    completion = ids[:, prompt_length:]
    is_eos = completion == tokenizer.eos_token_id
    # Tokens after the first end-of-text are padding (generate pads finished rows with it).
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = ~after_eos
    lengths = completion_mask.sum(dim=1).tolist()
    completion_ids = [row[:n] for row, n in zip(completion.tolist(), lengths, strict=True)]
    texts = tokenizer.batch_decode([[t for t in row if t != tokenizer.eos_token_id]
                                    for row in completion_ids], skip_special_tokens=True)
    attention_mask = torch.cat([batch["attention_mask"].repeat_interleave(k, dim=0),
                                completion_mask.long()], dim=1)
    return Rollout(ids, attention_mask, prompt_length, completion_mask, texts, completion_ids)


def token_logprobs(model, rollout: Rollout, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) of every completion token (n, completion) at the sampling temperature, and
    the entropy of pi at each of those positions (detached)."""
    # Positions count real tokens only, as generate counted them under left padding.
    position_ids = (rollout.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=rollout.ids, attention_mask=rollout.attention_mask,
                   position_ids=position_ids).logits
    logits = logits[:, rollout.prompt_length - 1:-1].float() / temperature
    logprobs = F.log_softmax(logits, dim=-1)
    targets = rollout.ids[:, rollout.prompt_length:]
    chosen = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return chosen, entropy


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         normalisation: str) -> torch.Tensor:
    """-advantage x log pi over the completion tokens: logprobs and mask (n, T), advantages
    (n,)."""
    per_token = -advantages.unsqueeze(1) * logprobs * mask
    if normalisation == "token":
        return per_token.sum() / mask.sum().clamp(min=1)
    return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def total_reward(rewards: Sequence[tuple[RewardFunction, float]], prompts: list[str],
                 rollout: Rollout, columns: dict[str, list]) -> torch.Tensor:
    """The weighted sum of the reward functions, one value per completion."""
    total = torch.zeros(len(rollout.texts))
    for function, weight in rewards:
        total += weight * torch.tensor(function(prompts=prompts, completions=rollout.texts,
                                                completion_ids=rollout.completion_ids,
                                                **columns), dtype=torch.float32)
    return total


def reinforce(policy, reference, tokenizer, prompts: Sequence[dict],
              rewards: Sequence[tuple[RewardFunction, float]], cfg: ReinforceConfig, seed: int,
              prompt_format: PromptFormat = PLAIN,
              log: Callable[[int, dict], None] = lambda step, stats: None,
              on_step: Callable[[int], None] = lambda step: None) -> int:
    """Train `policy` in place on `prompts` (dicts with a "prompt" and any columns the reward
    functions take, e.g. "answer"); `reference` is frozen. Returns the steps done."""
    baseline_of = BASELINES[cfg.baseline]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(policy.parameters()).device
    reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    order_rng = random.Random(seed)  # which prompts each step sees: shuffled passes
    torch.manual_seed(seed)  # the sampling
    order: list[int] = []
    for step in range(1, cfg.max_steps + 1):
        started = time.perf_counter()
        while len(order) < cfg.prompts_per_step:
            order += order_rng.sample(range(len(prompts)), len(prompts))
        batch = [prompts[i] for i in order[:cfg.prompts_per_step]]
        del order[:cfg.prompts_per_step]

        rollout = sample(policy, tokenizer, [b["prompt"] for b in batch], cfg.num_generations,
                         cfg.max_completion_length, cfg.temperature, prompt_format)
        repeated = [b for b in batch for _ in range(cfg.num_generations)]
        columns = {key: [b[key] for b in repeated] for key in repeated[0] if key != "prompt"}
        reward = total_reward(rewards, [b["prompt"] for b in repeated], rollout, columns)

        # The policy stays in eval mode: dropout would make log pi noise (TRL turns it off
        # too); gradients flow all the same.
        logprobs, entropy = token_logprobs(policy, rollout, cfg.temperature)
        mask = rollout.completion_mask.float()
        with torch.no_grad():
            reference_logprobs, _ = token_logprobs(reference, rollout, cfg.temperature)
            kl = ((logprobs - reference_logprobs) * mask).sum(dim=1).cpu()
        shaped = reward - cfg.beta * kl
        groups = shaped.view(-1, cfg.num_generations)
        baseline = baseline_of(groups)
        advantages = (groups - baseline).reshape(-1).to(device)
        loss = policy_gradient_loss(logprobs, advantages, mask, cfg.loss_normalisation)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()

        log(step, {"reward": reward.mean().item(), "baseline": baseline.mean().item(),
                   "advantage_std": advantages.std().item(),
                   "entropy": ((entropy * mask).sum() / mask.sum().clamp(min=1)).item(),
                   "kl": kl.mean().item(), "completion_length": mask.sum(dim=1).mean().item(),
                   "loss": loss.item(), "grad_norm": grad_norm.item(),
                   "step_time": time.perf_counter() - started})
        on_step(step)
    return cfg.max_steps
