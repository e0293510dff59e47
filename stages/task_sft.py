"""task_sft: the checkable task's problems (train and test, disjoint), and supervised finetuning
of the pretrained model on the train problems with teacher forcing (TRL's SFTTrainer, loss on
the answers only); measured before and after on the test problems."""

from llmpipe import layout
from llmpipe.io import write_metrics
from llmpipe.loading import load_causal_lm
from llmpipe.params import TaskSftParams, load_stage_params
from llmpipe.stage import run_main
from llmpipe.task import (
    chance_exact_match,
    make_problems,
    run_sft,
    save_task_model,
    task_report,
    write_problems,
)


def main() -> None:
    shared, p = load_stage_params(TaskSftParams)
    problems = make_problems(p.kind, p.digits, p.train_problems, p.test_problems, shared.seed)
    write_problems(layout.TASK_PROBLEMS, problems, p.kind, p.digits)
    base, tokenizer = load_causal_lm(p.base)
    before = task_report(base, tokenizer, problems["test"], p.pass_k, shared.seed)
    model, wall_s = run_sft(p, problems["train"], shared.seed, layout.live_dir("task_sft"))
    after = task_report(model, tokenizer, problems["test"], p.pass_k, shared.seed)
    save_task_model(layout.TASK_SFT_MODEL, model, tokenizer, after)
    metrics = {"kind": p.kind, "digits": p.digits, "train_problems": len(problems["train"]),
               "test_problems": len(problems["test"]),
               "chance_exact_match": chance_exact_match(p.kind, p.digits),
               **{f"base_{k}": v for k, v in before.items() if k != "samples"},
               **{k: v for k, v in after.items() if k != "samples"},
               "perf": {"wall_s": wall_s}}
    write_metrics("task_sft", metrics)
    print(f"{p.kind} ({p.digits} digits), test problems: teacher-forced token accuracy "
          f"{after['teacher_forced_token_accuracy']:.3f}, free-running exact match "
          f"{after['exact_match']:.3f} (base {before['exact_match']:.3f}), pass@{p.pass_k} "
          f"{after[f'pass_at_{p.pass_k}']:.3f} -> {layout.TASK_SFT_MODEL}")


if __name__ == "__main__":
    run_main(main)
