"""grpo: TRL's GRPOTrainer on the finetuned policy against the reward model; the policy is
measured before and after on held-out prompts with the same sampling seed."""

import time

from llmpipe import layout
from llmpipe.chat import PromptFormat
from llmpipe.loading import load_causal_lm
from llmpipe.params import GrpoParams, load_stage_params
from llmpipe.preferences import read_prompts
from llmpipe.rlhf import (
    check_curve,
    check_grpo_launch,
    finish_rl_stage,
    load_judges,
    policy_report,
    reward_functions,
    run_grpo,
)
from llmpipe.runtime import is_main_process
from llmpipe.sampling import Sampling
from llmpipe.stage import run_main


def main() -> None:
    shared, p = load_stage_params(GrpoParams)
    check_grpo_launch(p)  # before minutes of measuring
    check_curve(p)
    train_prompts = read_prompts(layout.PREFERENCES, "train")
    heldout = read_prompts(layout.PREFERENCES, "heldout")
    # The same prompts and sampling seed before and after, measured once: by the main process
    # under a launcher (the others build the trainer and wait for it in their first
    # collective, within the Trainer's ddp_timeout of 30 minutes).
    sampling = Sampling(p.eval_samples, p.max_completion_length, p.temperature, shared.seed)
    main_process = is_main_process()
    if main_process:
        reference, tokenizer = load_causal_lm(layout.FINETUNE_MODEL)
        judges = load_judges(layout.PREFERENCES, layout.REWARD_MODEL, reference)
        before = policy_report(reference, tokenizer, heldout, sampling, judges)
        curve_prompts = heldout[:p.curve_prompts]

        def heldout_report(model):
            return policy_report(model, tokenizer, curve_prompts, sampling, judges)
    started = time.perf_counter()
    prompt_format = PromptFormat.read(layout.PREFERENCES)
    policy, steps = run_grpo(layout.FINETUNE_MODEL,
                             reward_functions(layout.REWARD_MODEL, prompt_format, p),
                             train_prompts, prompt_format, p, shared.seed, layout.live_dir("grpo"),
                             heldout_report if main_process else None, p.curve_interval)
    wall_s = time.perf_counter() - started
    if not main_process:
        return
    after = policy_report(policy, tokenizer, heldout, sampling, judges)
    finish_rl_stage("grpo", layout.GRPO_MODEL, policy, tokenizer, before, after, p, steps,
                    len(heldout), wall_s)


if __name__ == "__main__":
    run_main(main)
