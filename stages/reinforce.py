"""reinforce: REINFORCE written from scratch (llmpipe.rl.reinforce) on the finetuned policy
against the reward model (or the gold scorer); measured after on the held-out prompts as
rl_baseline measured it before, so it compares with grpo at an equal number of completions."""

import time

from llmpipe import layout
from llmpipe.model.loading import load_causal_lm
from llmpipe.params import load_stage_params
from llmpipe.rl.harness import HeldoutMeasure, check_same_dtype, read_baseline
from llmpipe.rl.params import ReinforceParams
from llmpipe.rl.preferences import read_prompts
from llmpipe.rl.reinforce import config_from, reinforce
from llmpipe.rl.rlhf import HeldoutCurve, finish_rl_stage, rlhf_rewards
from llmpipe.runtime import fp32_master_weights
from llmpipe.stage import run_main
from llmpipe.train.tracking import curves_live


def main() -> None:
    shared, p = load_stage_params(ReinforceParams)
    settings, before = read_baseline()
    check_same_dtype("reinforce", p.dtype, settings)
    measure = HeldoutMeasure.load(settings)  # its reference is also the KL's
    policy = fp32_master_weights(load_causal_lm(layout.FINETUNE_MODEL)[0])
    live = curves_live(layout.live_dir("reinforce"))
    curve = HeldoutCurve(
        lambda model: measure.report(model, measure.prompts[: p.curve_prompts]),
        p.curve_interval,
        live,
    )
    curve.measure(policy, 0)
    started = time.perf_counter()
    steps = reinforce(
        policy,
        measure.reference,
        measure.tokenizer,
        [{"prompt": q} for q in read_prompts(layout.PREFERENCES, "train")],
        rlhf_rewards(p.reward, measure.judges, p.length_penalty),
        config_from(p),
        shared.seed,
        measure.judges.prompt_format,
        log=curve.log_training,
        on_step=lambda step: curve.measure(policy, step),
    )
    wall_s = time.perf_counter() - started
    live.end()
    finish_rl_stage(
        "reinforce",
        layout.REINFORCE_MODEL,
        policy,
        measure.tokenizer,
        before,
        measure.report(policy),
        p,
        steps,
        len(measure.prompts),
        wall_s,
    )


if __name__ == "__main__":
    run_main(main)
