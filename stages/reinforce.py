"""reinforce: REINFORCE written from scratch (llmpipe.reinforce) on the finetuned policy against
the reward model (or the gold scorer); measured before and after on the same held-out prompts
and sampling seed as grpo, so the two compare at an equal number of sampled completions."""

import time

from llmpipe import layout
from llmpipe.loading import load_causal_lm
from llmpipe.params import ReinforceParams, load_stage_params
from llmpipe.preferences import read_prompts
from llmpipe.reinforce import compute_autocast, config_from, frozen_reference, reinforce
from llmpipe.rlhf import (
    HeldoutCurve,
    finish_rl_stage,
    load_judges,
    policy_report,
    rlhf_rewards,
)
from llmpipe.runtime import default_device, fp32_master_weights
from llmpipe.sampling import Sampling
from llmpipe.stage import run_main
from llmpipe.tracking import curves_live


def main() -> None:
    shared, p = load_stage_params(ReinforceParams)
    train_prompts = read_prompts(layout.PREFERENCES, "train")
    heldout = read_prompts(layout.PREFERENCES, "heldout")
    sampling = Sampling(p.eval_samples, p.max_completion_length, p.temperature, shared.seed)
    # The reference is also the judges' (KL, fluency): in the compute dtype before any report,
    # and every report under the loop's autocast (the CPU's too, where the loop offloads the
    # reference: reference_device), so that before and after compare alike.
    reference, tokenizer = load_causal_lm(layout.FINETUNE_MODEL)
    frozen_reference(reference, p.dtype)
    judges = load_judges(layout.PREFERENCES, layout.REWARD_MODEL, reference)

    def report(model, prompts):
        with compute_autocast(default_device(), p.dtype), compute_autocast("cpu", p.dtype):
            return policy_report(model, tokenizer, prompts, sampling, judges)

    before = report(reference, heldout)

    policy = fp32_master_weights(load_causal_lm(layout.FINETUNE_MODEL)[0])
    live = curves_live(layout.live_dir("reinforce"))
    curve = HeldoutCurve(lambda model: report(model, heldout[:p.curve_prompts]),
                         p.curve_interval, live)
    curve.measure(policy, 0)
    started = time.perf_counter()
    steps = reinforce(policy, reference, tokenizer, [{"prompt": q} for q in train_prompts],
                      rlhf_rewards(p.reward, judges, p.length_penalty), config_from(p), shared.seed,
                      judges.prompt_format,
                      log=curve.log_training, on_step=lambda step: curve.measure(policy, step))
    wall_s = time.perf_counter() - started
    live.end()
    after = report(policy, heldout)
    finish_rl_stage("reinforce", layout.REINFORCE_MODEL, policy, tokenizer, before, after, p,
                    steps, len(heldout), wall_s)


if __name__ == "__main__":
    run_main(main)
