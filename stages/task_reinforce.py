"""task_reinforce: REINFORCE (llmpipe.rl.reinforce) from the task's SFT model with the exact-match
checker as the reward; exact match and pass@k on the test problems before and after."""

import time

from llmpipe import layout
from llmpipe.model.loading import load_causal_lm
from llmpipe.params import load_stage_params
from llmpipe.rl.reinforce import config_from, reinforce
from llmpipe.stage import run_main
from llmpipe.task.checkable import TaskSet, exact_match_reward, finish_task_rl, read_task_report
from llmpipe.task.params import TaskReinforceParams
from llmpipe.train.tracking import curves_live, log_step


def main() -> None:
    shared, p = load_stage_params(TaskReinforceParams)
    task = TaskSet.read(layout.TASK_PROBLEMS)
    policy, tokenizer = load_causal_lm(layout.TASK_SFT_MODEL)
    # The reference only prices the KL: with beta 0 there is none to load.
    reference = load_causal_lm(layout.TASK_SFT_MODEL)[0] if p.beta > 0 else None
    live = curves_live(layout.live_dir("task_reinforce"))
    started = time.perf_counter()
    steps = reinforce(
        policy,
        reference,
        tokenizer,
        task.rl_rows(),
        [(exact_match_reward, 1.0)],
        config_from(p),
        shared.seed,
        task.prompt_format,
        log=lambda step, stats: log_step(live, step, stats),
    )
    wall_s = time.perf_counter() - started
    live.end()
    finish_task_rl(
        "task_reinforce",
        layout.TASK_REINFORCE_MODEL,
        policy,
        tokenizer,
        task,
        read_task_report(layout.TASK_SFT_MODEL),
        steps,
        p,
        shared.seed,
        wall_s,
    )


if __name__ == "__main__":
    run_main(main)
