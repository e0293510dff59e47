"""task_sft: the checkable task's problems (train and test, disjoint), and supervised finetuning
of the base model on the train problems with teacher forcing (TRL's SFTTrainer, loss on the
answers only); measured before and after on the test problems."""

from llmpipe import layout
from llmpipe.data.chat import PromptFormat
from llmpipe.evaluation.intervals import gain_metrics, level_metrics, write_items
from llmpipe.io import write_metrics
from llmpipe.model.loading import load_causal_lm
from llmpipe.params import load_stage_params
from llmpipe.runtime import fp32_master_weights
from llmpipe.stage import run_main
from llmpipe.task.checkable import (
    TaskSet,
    chance_exact_match,
    load_problems,
    run_sft,
    save_task_model,
    task_report,
)
from llmpipe.task.params import TaskSftParams


def main() -> None:
    shared, p = load_stage_params(TaskSftParams)
    base, tokenizer = load_causal_lm(p.base)
    fp32_master_weights(base)  # measured in the precision of the weights SFT trains (run_sft)
    prompt_format = PromptFormat(p.chat)
    prompt_format.check(tokenizer, "task_sft.chat")
    task = TaskSet(
        load_problems(p.kind, p.source, p.digits, p.train_problems, p.test_problems, shared.seed),
        p.kind,
        p.digits,
        prompt_format,
    )
    task.write(layout.TASK_PROBLEMS)
    test = task.problems["test"]
    before = task_report(
        base, tokenizer, test, p.kind, p.pass_k, p.pass_samples, shared.seed, prompt_format
    )
    model, wall_s = run_sft(
        p, task.problems["train"], prompt_format, shared.seed, layout.live_dir("task_sft")
    )
    after = task_report(
        model, tokenizer, test, p.kind, p.pass_k, p.pass_samples, shared.seed, prompt_format
    )
    save_task_model(layout.TASK_SFT_MODEL, model, tokenizer, after)
    write_items(layout.items_file("task_sft"), before, after)  # the base model, then SFT
    metrics = {
        "kind": p.kind,
        "digits": p.digits,
        "train_problems": len(task.problems["train"]),
        "test_problems": len(test),
        "chance_exact_match": chance_exact_match(p.kind, p.digits),
        **level_metrics(before, "base_"),
        **level_metrics(after),
        **gain_metrics(before, after, {"exact_match": "exact_match_gain"}),
        "perf": {"wall_s": wall_s},
    }
    write_metrics("task_sft", metrics)
    print(
        f"{p.kind}, test problems: teacher-forced token accuracy "
        f"{after['teacher_forced_token_accuracy']:.3f}, free-running exact match "
        f"{after['exact_match']:.3f} (base {before['exact_match']:.3f}), pass@{p.pass_k} "
        f"{after[f'pass_at_{p.pass_k}']:.3f} -> {layout.TASK_SFT_MODEL}"
    )


if __name__ == "__main__":
    run_main(main)
