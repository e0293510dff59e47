"""grpo: TRL's GRPOTrainer on the finetuned policy against the reward model; measured after on
the held-out prompts as rl_baseline measured it before (same settings and sampling seed)."""

import time

from llmpipe import layout
from llmpipe.data.chat import PromptFormat
from llmpipe.params import load_stage_params
from llmpipe.rl.harness import HeldoutMeasure, read_baseline
from llmpipe.rl.params import GrpoParams
from llmpipe.rl.preferences import read_prompts
from llmpipe.rl.rlhf import (
    check_curve,
    check_grpo_launch,
    finish_rl_stage,
    reward_functions,
    run_grpo,
)
from llmpipe.runtime import is_main_process
from llmpipe.stage import run_main


def main() -> None:
    shared, p = load_stage_params(GrpoParams)
    check_grpo_launch(p)  # before minutes of loading
    check_curve(p)
    settings, before = read_baseline()
    # Measured by the main process under a launcher (the others build the trainer and wait for
    # it in their first collective, within the Trainer's ddp_timeout of 30 minutes).
    measure = HeldoutMeasure.load(settings) if is_main_process() else None
    curve = (
        (lambda model: measure.report(model, measure.prompts[: p.curve_prompts]))
        if measure
        else None
    )
    prompt_format = PromptFormat.read(layout.PREFERENCES)
    started = time.perf_counter()
    policy, steps = run_grpo(
        layout.FINETUNE_MODEL,
        reward_functions(layout.REWARD_MODEL, prompt_format, p),
        read_prompts(layout.PREFERENCES, "train"),
        prompt_format,
        p,
        shared.seed,
        layout.live_dir("grpo"),
        curve,
        p.curve_interval,
    )
    wall_s = time.perf_counter() - started
    if measure is None:
        return
    finish_rl_stage(
        "grpo",
        layout.GRPO_MODEL,
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
