"""reinforce: REINFORCE written from scratch (llmpipe.rl.reinforce) on the finetuned policy
against the reward model (or the gold scorer); measured after on the held-out prompts as
rl_baseline measured it before, so it compares with grpo at an equal number of completions."""

from llmpipe import layout
from llmpipe.params import load_stage_params
from llmpipe.rl.harness import finish_rl, train_with_reinforce
from llmpipe.rl.heldout import check_same_dtype, read_baseline, rlhf_run
from llmpipe.rl.params import ReinforceParams
from llmpipe.stage import run_main


def main() -> None:
    shared, p = load_stage_params(ReinforceParams)
    check_same_dtype("reinforce", p.dtype, read_baseline()[0])  # before minutes of loading
    run = rlhf_run(p)  # the judges' reference is also the KL's
    policy, steps, wall_s = train_with_reinforce(run, p, shared.seed, "reinforce")
    finish_rl(run, "reinforce", layout.REINFORCE_MODEL, policy, steps, p, wall_s)


if __name__ == "__main__":
    run_main(main)
