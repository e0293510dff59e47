"""REINFORCE written out (llmpipe.rl.reinforce): its baselines, its loss, and that it learns."""

import math

import pytest
import torch

from llmpipe import layout
from llmpipe.model.loading import load_causal_lm
from llmpipe.rl.reinforce import (
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
        (4 - 2) / 5
    )
    assert policy_gradient_loss(logprobs, advantages, mask, "sequence").item() == pytest.approx(
        (1 - 2) / 2
    )


def test_reinforce_raises_a_toy_reward_in_a_few_steps(micro_pretrained):
    """Reward: the share of one token in the completion, the token the micro model samples most
    often at first. A few policy-gradient steps make it much more frequent."""
    from collections import Counter

    from llmpipe.rl.reinforce import sample

    policy, tokenizer = load_causal_lm(micro_pretrained / layout.PRETRAIN_MODEL, device="cpu")
    reference, _ = load_causal_lm(micro_pretrained / layout.PRETRAIN_MODEL, device="cpu")
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [{"prompt": q} for q in ("Return the", "This module", "The value of", "If a")]
    torch.manual_seed(0)
    first = sample(policy, tokenizer, [p["prompt"] for p in prompts], 8, 8, 1.0)
    target = Counter(t for ids in first.completion_ids for t in ids).most_common(1)[0][0]

    def share_of_target(prompts, completions, completion_ids, **kwargs):
        return [sum(t == target for t in ids) / max(len(ids), 1) for ids in completion_ids]

    cfg = ReinforceConfig(
        num_generations=8,
        prompts_per_step=4,
        max_steps=20,
        learning_rate=2e-2,
        max_completion_length=8,
        temperature=1.0,
        baseline="rloo",
        loss_normalisation="token",
        beta=0.0,
        grad_clip=1.0,
    )
    curve = []
    reinforce(
        policy,
        reference,
        tokenizer,
        prompts,
        [(share_of_target, 1.0)],
        cfg,
        seed=0,
        log=lambda step, stats: curve.append(stats),
    )
    assert len(curve) == 20
    assert {"reward", "baseline", "advantage_std", "entropy", "kl", "completion_length"} <= set(
        curve[0]
    )
    assert all(0 <= s["frac_reward_zero_std"] <= 1 for s in curve)
    first, last = (sum(s["reward"] for s in part) / 3 for part in (curve[:3], curve[-3:]))
    assert last > first + 0.2, [round(s["reward"], 3) for s in curve]  # from about 0.01
    assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-5) and curve[-1]["kl"] > 0


# --- GPU settings: master weights, compute dtype, passes, the reference's place ---------------


def test_a_bf16_weight_moves_through_fp32_master_weights_where_a_bf16_update_rounds_away():
    """An AdamW step of 1e-4 on a weight of 1.0: bf16 holds 1.0 - 1e-4 as 1.0 (its numbers near
    1 are 2^-8 apart), so a bf16 weight never moves; its float32 master copy does, the forward
    still computed in bf16 (autocast)."""
    from llmpipe.runtime import compute_autocast, fp32_master_weights

    def one_step(master: bool) -> torch.Tensor:
        layer = torch.nn.Linear(4, 1, bias=False)
        torch.nn.init.ones_(layer.weight)
        layer.to(torch.bfloat16)
        if master:
            assert fp32_master_weights(layer) is layer
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4, weight_decay=0.0)
        with compute_autocast("cpu", "bfloat16"):
            out = layer(torch.ones(2, 4))
        assert out.dtype == torch.bfloat16  # bf16 compute either way
        out.sum().backward()
        optimizer.step()
        return layer.weight.detach()

    plain, master = one_step(False), one_step(True)
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, torch.ones_like(plain))
    assert master.dtype == torch.float32
    assert master.sub(1 - 1e-4).abs().max().item() < 1e-6


def test_fp32_master_weights_leave_frozen_weights_and_keep_tied_ones_tied(micro_dir):
    from llmpipe.runtime import fp32_master_weights

    model, _ = load_causal_lm(micro_dir, device="cpu")
    model.to(torch.bfloat16)
    model.transformer.h[0].requires_grad_(False)
    fp32_master_weights(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    assert model.transformer.wte.weight.dtype == torch.float32
    assert {p.dtype for p in model.transformer.h[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.transformer.h[1].parameters()} == {torch.float32}


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    """A random-init micro GPT-2 and its tokenizer (seconds; no pipeline run)."""
    from conftest import save_micro_model

    directory = tmp_path_factory.mktemp("micro")
    save_micro_model(directory)
    return directory


PROMPTS = [{"prompt": q} for q in ("Return the", "This module", "The value of", "If a")]


def share_of_sevens(prompts, completions, completion_ids, **kwargs):
    return [sum(t % 7 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def micro_run(micro_dir, steps=3, reference=True, **settings):
    """A few REINFORCE steps on the micro model: (figures per step without the timing, policy)."""
    policy, tokenizer = load_causal_lm(micro_dir, device="cpu")
    ref = load_causal_lm(micro_dir, device="cpu")[0] if reference else None
    cfg = ReinforceConfig(
        **{
            **dict(
                num_generations=4,
                prompts_per_step=3,
                max_steps=steps,
                learning_rate=1e-2,
                max_completion_length=6,
                temperature=1.0,
                baseline="rloo",
                loss_normalisation="token",
                beta=0.1,
                grad_clip=1.0,
            ),
            **settings,
        }
    )
    curve = []
    reinforce(
        policy,
        ref,
        tokenizer,
        PROMPTS,
        [(share_of_sevens, 1.0)],
        cfg,
        seed=3,
        log=lambda step, stats: curve.append({k: v for k, v in stats.items() if k != "step_time"}),
    )
    return curve, policy


def test_the_linear_schedule_decays_the_rate_to_zero_and_the_constant_one_keeps_it(micro_dir):
    constant, constant_policy = micro_run(micro_dir, steps=4)
    linear, linear_policy = micro_run(micro_dir, steps=4, lr_schedule="linear")
    assert [s["learning_rate"] for s in constant] == [1e-2] * 4
    # as transformers' linear schedule without warmup: step s (from 0) at 1 - s / 4
    assert [s["learning_rate"] for s in linear] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert linear[0] == constant[0]  # the first step at the whole rate, the same step
    assert any(
        not torch.equal(a, b)
        for a, b in zip(constant_policy.parameters(), linear_policy.parameters(), strict=True)
    )


def test_a_run_in_passes_smaller_than_the_step_and_an_offloaded_reference(micro_dir):
    same, policy = micro_run(micro_dir)
    # The reference on the CPU: on a CPU run, the very same figures and weights.
    offloaded, offloaded_policy = micro_run(micro_dir, reference_device="cpu")
    assert offloaded == same
    assert all(
        torch.equal(a, b)
        for a, b in zip(policy.parameters(), offloaded_policy.parameters(), strict=True)
    )
    # A pass as large as the step is the one-pass run; smaller passes (4: one prompt group)
    # sample other completions from the same seed, and train all the same.
    assert micro_run(micro_dir, generation_batch_size=12)[0] == same
    for normalisation in ("token", "sequence"):
        curve, _ = micro_run(micro_dir, generation_batch_size=4, loss_normalisation=normalisation)
        assert len(curve) == 3 and set(curve[0]) == set(same[0])
        assert all(math.isfinite(v) for stats in curve for v in stats.values())
        assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-6) and curve[-1]["kl"] > 0


def subrollout(rollout, rows):
    from llmpipe.rl.reinforce import Rollout

    return Rollout(
        rollout.ids[rows],
        rollout.attention_mask[rows],
        rollout.prompt_length,
        rollout.completion_mask[rows],
        rollout.texts[rows],
        rollout.completion_ids[rows],
    )


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_scoring_a_step_in_passes_gives_the_whole_steps_gradient(micro_dir, normalisation, beta):
    """The same completions scored in one pass or in three (the gradient accumulated over them,
    the KL taken first where beta needs it): the same figures and gradient, up to rounding."""
    from llmpipe.rl.reinforce import backward_step, sample

    policy, tokenizer = load_causal_lm(micro_dir, device="cpu")
    reference, _ = load_causal_lm(micro_dir, device="cpu")
    reference.eval().requires_grad_(False)
    tokenizer.pad_token = tokenizer.eos_token
    with torch.no_grad():  # a policy that has moved off the reference: a KL to shape with
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    cfg = ReinforceConfig(
        num_generations=4,
        prompts_per_step=3,
        max_steps=1,
        learning_rate=1e-2,
        max_completion_length=6,
        temperature=1.0,
        baseline="rloo",
        loss_normalisation=normalisation,
        beta=beta,
        grad_clip=1.0,
    )
    torch.manual_seed(0)
    rollout = sample(policy, tokenizer, [q["prompt"] for q in PROMPTS[:3]], 4, 6, 1.0)
    reward = torch.randn(12, generator=torch.Generator().manual_seed(2))
    results = []
    for rollouts in ([rollout], [subrollout(rollout, slice(i, i + 4)) for i in (0, 4, 8)]):
        policy.zero_grad(set_to_none=True)
        figures = backward_step(policy, reference, rollouts, reward, cfg)
        results.append((figures, [p.grad.clone() for p in policy.parameters()]))
    (whole, whole_grads), (passes, pass_grads) = results
    assert whole["kl"] > 0.01
    assert passes == pytest.approx(whole, rel=1e-5, abs=1e-6)
    assert (
        max((a - b).abs().max().item() for a, b in zip(whole_grads, pass_grads, strict=True)) < 1e-6
    )


def test_bf16_compute_trains_float32_master_weights_of_a_bf16_policy(micro_dir):
    policy, tokenizer = load_causal_lm(micro_dir, device="cpu")
    reference, _ = load_causal_lm(micro_dir, device="cpu")
    policy.to(torch.bfloat16)  # as a checkpoint saved in bf16 loads
    start = {name: p.detach().float().clone() for name, p in policy.named_parameters()}
    cfg = ReinforceConfig(
        num_generations=4,
        prompts_per_step=2,
        max_steps=2,
        learning_rate=1e-4,
        max_completion_length=6,
        temperature=1.0,
        baseline="rloo",
        loss_normalisation="token",
        beta=0.1,
        grad_clip=1.0,
        dtype="bfloat16",
        generation_batch_size=4,
    )
    curve = []
    reinforce(
        policy,
        reference,
        tokenizer,
        PROMPTS,
        [(share_of_sevens, 1.0)],
        cfg,
        seed=0,
        log=lambda step, stats: curve.append(stats),
    )
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}  # the compute dtype
    assert not any(p.requires_grad for p in reference.parameters())
    assert len(curve) == 2 and all(math.isfinite(v) for s in curve for v in s.values())
    # Updates of ~1e-4: the float32 weights took them; in bf16 many would round away (the
    # layer norms' weights of 1.0 all would).
    changed = sum((p.detach() != start[name]).sum().item() for name, p in policy.named_parameters())
    kept_in_bf16 = sum(
        (p.detach().to(torch.bfloat16).float() != start[name]).sum().item()
        for name, p in policy.named_parameters()
    )
    assert changed > 0.5 * sum(p.numel() for p in start.values())
    assert kept_in_bf16 < changed
    assert policy.transformer.ln_f.weight.ne(1.0).all()
    assert policy.transformer.ln_f.weight.to(torch.bfloat16).eq(1.0).all()


def test_without_a_reference_beta_must_be_zero_and_no_kl_is_logged(micro_dir):
    curve, _ = micro_run(micro_dir, steps=1, reference=False, beta=0.0)
    assert "kl" not in curve[0] and curve[0]["completion_length"] > 0
    with pytest.raises(ValueError, match="beta > 0 needs a reference model"):
        micro_run(micro_dir, steps=1, reference=False, beta=0.1)


@pytest.mark.parametrize("stage", ["reinforce", "task_reinforce"])
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dtype", "float16", "dtype: 'float16' is not one of 'float32', 'bfloat16'"),
        ("generation_batch_size", 0, "generation_batch_size: 0 is not a positive integer"),
        ("generation_batch_size", "all", "generation_batch_size: 'all' is not a positive integer"),
        (
            "generation_batch_size",
            6,
            r"generation_batch_size: 6 is not a multiple of "
            r"num_generations \(4\)",
        ),
        ("reference_device", "cuda", "reference_device: 'cuda' is not one of 'same', 'cpu'"),
    ],
)
def test_bad_gpu_settings_are_one_line_errors(stage, key, value, message):
    from conftest import ROOT
    from llmpipe.errors import ParamsError
    from llmpipe.params import build, read_params_file
    from llmpipe.pipeline import STAGE_SCHEMAS

    # groups of 4 (the message's numbers), whatever params.yaml's group size is
    raw = {**read_params_file(ROOT / "params.yaml")[stage], "num_generations": 4}
    built = build(STAGE_SCHEMAS[stage], {**raw, "generation_batch_size": 8}, stage)
    assert built.generation_batch_size == 8
    with pytest.raises(ParamsError, match=rf"^{stage}\.{message}") as error:
        build(STAGE_SCHEMAS[stage], {**raw, key: value}, stage)
    assert "\n" not in str(error.value)


def test_the_share_of_groups_without_a_gradient():
    from llmpipe.rl.reinforce import zero_std_share

    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert zero_std_share(rewards, 4) == pytest.approx(2 / 3)  # all right, mixed, all wrong
    assert zero_std_share(rewards, 2) == pytest.approx(4 / 6)
