"""task_reinforce: REINFORCE (llmpipe.rl.reinforce) from the task's SFT model with the exact-match
checker as the reward; exact match and pass@k on the test problems before and after."""

from llmpipe import layout
from llmpipe.params import load_stage_params
from llmpipe.rl.harness import finish_rl, train_with_reinforce
from llmpipe.stage import run_main
from llmpipe.task.checkable import task_run
from llmpipe.task.params import TaskReinforceParams


def main() -> None:
    shared, p = load_stage_params(TaskReinforceParams)
    run = task_run(shared.seed, p.reward)
    policy, steps, wall_s = train_with_reinforce(run, p, shared.seed, "task_reinforce")
    finish_rl(run, "task_reinforce", layout.TASK_REINFORCE_MODEL, policy, steps, p, wall_s)


if __name__ == "__main__":
    run_main(main)
