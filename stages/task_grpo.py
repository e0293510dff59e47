"""task_grpo: TRL's GRPO from the task's SFT model with the same exact-match reward as
task_reinforce; exact match and pass@k on the test problems before and after."""

from llmpipe import layout
from llmpipe.params import load_stage_params
from llmpipe.rl.harness import finish_rl, train_with_grpo
from llmpipe.stage import run_main
from llmpipe.task.checkable import task_run
from llmpipe.task.params import TaskGrpoParams


def main() -> None:
    shared, p = load_stage_params(TaskGrpoParams)
    run = task_run(shared.seed, p.reward)
    policy, steps, wall_s = train_with_grpo(run, p, shared.seed, "task_grpo")
    if policy is not None:  # the main process
        finish_rl(run, "task_grpo", layout.TASK_GRPO_MODEL, policy, steps, p, wall_s)


if __name__ == "__main__":
    run_main(main)
