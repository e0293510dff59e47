"""REINFORCE written out (llmpipe.reinforce): its baselines, its loss, and that it learns."""

import pytest
import torch

from llmpipe import layout
from llmpipe.loading import load_causal_lm
from llmpipe.reinforce import (
    ReinforceConfig,
    group_mean_baseline,
    policy_gradient_loss,
    reinforce,
    rloo_baseline,
)


def test_the_rloo_baseline_is_the_mean_of_the_others_in_the_group():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 0.0]])
    baseline = rloo_baseline(rewards)
    for g in range(2):
        for i in range(4):
            others = [rewards[g, j].item() for j in range(4) if j != i]
            assert baseline[g, i].item() == pytest.approx(sum(others) / 3)
    assert torch.equal(group_mean_baseline(rewards), rewards.mean(1, keepdim=True).expand(2, 4))


def test_token_and_sequence_normalisation_weigh_completions_differently():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    # token: (4 x 1 - 2) / 5 tokens; sequence: mean of 4/4 and -2/1
    assert policy_gradient_loss(logprobs, advantages, mask, "token").item() == pytest.approx(
        (4 - 2) / 5)
    assert policy_gradient_loss(logprobs, advantages, mask, "sequence").item() == \
        pytest.approx((1 - 2) / 2)


def test_reinforce_raises_a_toy_reward_in_a_few_steps(micro_pretrained):
    """Reward: the share of one token in the completion, the token the micro model samples most
    often at first. A few policy-gradient steps make it much more frequent."""
    from collections import Counter

    from llmpipe.reinforce import sample

    policy, tokenizer = load_causal_lm(micro_pretrained / layout.PRETRAIN_MODEL, device="cpu")
    reference, _ = load_causal_lm(micro_pretrained / layout.PRETRAIN_MODEL, device="cpu")
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [{"prompt": q} for q in ("Return the", "This module", "The value of", "If a")]
    torch.manual_seed(0)
    first = sample(policy, tokenizer, [p["prompt"] for p in prompts], 8, 8, 1.0)
    target = Counter(t for ids in first.completion_ids for t in ids).most_common(1)[0][0]

    def share_of_target(prompts, completions, completion_ids, **kwargs):
        return [sum(t == target for t in ids) / max(len(ids), 1) for ids in completion_ids]

    cfg = ReinforceConfig(num_generations=8, prompts_per_step=4, max_steps=20,
                          learning_rate=2e-2, max_completion_length=8, temperature=1.0,
                          baseline="rloo", loss_normalisation="token", beta=0.0, grad_clip=1.0)
    curve = []
    reinforce(policy, reference, tokenizer, prompts, [(share_of_target, 1.0)], cfg, seed=0,
              log=lambda step, stats: curve.append(stats))
    assert len(curve) == 20
    assert {"reward", "baseline", "advantage_std", "entropy", "kl", "completion_length"} <= \
        set(curve[0])
    first, last = (sum(s["reward"] for s in part) / 3 for part in (curve[:3], curve[-3:]))
    assert last > first + 0.2, [round(s["reward"], 3) for s in curve]  # from about 0.01
    assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-5) and curve[-1]["kl"] > 0
