"""grpo: TRL's GRPOTrainer on the finetuned policy against the reward model; measured after on
the held-out prompts as rl_baseline measured it before (same settings and sampling seed)."""

from llmpipe import layout
from llmpipe.params import load_stage_params
from llmpipe.rl.grpo import check_curve, check_grpo_launch
from llmpipe.rl.harness import finish_rl, train_with_grpo
from llmpipe.rl.heldout import rlhf_run
from llmpipe.rl.params import GrpoParams
from llmpipe.stage import run_main


def main() -> None:
    shared, p = load_stage_params(GrpoParams)
    check_grpo_launch(p)  # before minutes of loading
    check_curve(p)
    # Under a launcher the main process measures; every process scores with its own reward
    # model (the others wait in their first collective, within the Trainer's ddp_timeout).
    run = rlhf_run(p, separate_reward_model=True)
    policy, steps, wall_s = train_with_grpo(run, p, shared.seed, "grpo")
    if policy is not None:  # the main process
        finish_rl(run, "grpo", layout.GRPO_MODEL, policy, steps, p, wall_s)


if __name__ == "__main__":
    run_main(main)
