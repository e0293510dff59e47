"""task_grpo: TRL's GRPO from the task's SFT model with the same exact-match reward as
task_reinforce; exact match and pass@k on the test problems before and after."""

import time

from llmpipe import layout
from llmpipe.model.loading import load_tokenizer
from llmpipe.params import load_stage_params
from llmpipe.rl.rlhf import run_grpo
from llmpipe.stage import run_main
from llmpipe.task.checkable import TaskSet, exact_match_reward, finish_task_rl, read_task_report
from llmpipe.task.params import TaskGrpoParams


def main() -> None:
    shared, p = load_stage_params(TaskGrpoParams)
    task = TaskSet.read(layout.TASK_PROBLEMS)
    started = time.perf_counter()
    policy, steps = run_grpo(
        layout.TASK_SFT_MODEL,
        [(exact_match_reward, 1.0)],
        task.rl_rows(),
        task.prompt_format,
        p,
        shared.seed,
        layout.live_dir("task_grpo"),
    )
    wall_s = time.perf_counter() - started
    if policy is None:  # not the main process
        return
    finish_task_rl(
        "task_grpo",
        layout.TASK_GRPO_MODEL,
        policy,
        load_tokenizer(layout.TASK_SFT_MODEL),
        task,
        read_task_report(layout.TASK_SFT_MODEL),
        steps,
        p,
        shared.seed,
        wall_s,
    )


if __name__ == "__main__":
    run_main(main)
