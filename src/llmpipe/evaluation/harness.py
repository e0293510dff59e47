"""EleutherAI's lm-evaluation-harness on the pipeline's models: the benchmarks the field reports
(HellaSwag, ARC-Easy, LAMBADA, PIQA through the hub at the GPU scale), and offline a task that
ships here, through the harness's own local-task support (`include_path`).

The shipped task, `llmpipe_cloze`, is multiple-choice cloze: the opening of a sentence from a
held-out document of the finetune corpus (the embedded default: the Python reference, its
validation split), and four endings, one of them true, three taken from other held-out
sentences. Chance is 25%. The evaluate stage builds the items from the run's own validation
split (llmpipe.evaluation.cloze), so no item comes from a document a stage trained on, for any
seed; `cloze_items` names their file.

lm-eval is an optional extra (`pip install -e '.[eval]'`, part of `.[dev]`).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from llmpipe.errors import ParamsError

TASKS_DIR = Path(__file__).parent / "harness_tasks"  # the harness's include_path
# What goes into the metrics: the harness's accuracy and, for tasks that define it, accuracy
# with the log-likelihood normalised by the ending's length in bytes (HellaSwag reports that).
METRICS = ("acc", "acc_norm")
# Accuracy of a uniform guess, the baseline beside each task's figure.
CHANCE = {"llmpipe_cloze": 0.25, "hellaswag": 0.25, "arc_easy": 0.25, "piqa": 0.5}


def check_harness(tasks: Sequence[str] | None, param: str = "evaluate.harness_tasks") -> None:
    """Before minutes of work: the harness is installed and knows every task."""
    if not tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ParamsError(
            f"{param}: {list(tasks)} needs lm-evaluation-harness, which is not "
            "installed (pip install -e '.[eval]'), or set it to null"
        )
    unknown = [t for t in tasks if t not in _task_manager_for(tasks).all_tasks]
    if unknown:
        raise ParamsError(
            f"{param}: unknown task(s) {unknown} (lm-eval's task names, e.g. "
            f"hellaswag, arc_easy, lambada_openai, piqa; offline: llmpipe_cloze)"
        )


@functools.cache
def _task_manager(shipped_only: bool, cloze_items: str | None):
    """The harness's task index. Indexing its own thousands of tasks takes about 10 s, skipped
    when every task asked for ships here. Its metadata reaches each task's dataset loader."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        verbosity="ERROR",
        include_path=str(TASKS_DIR),
        include_defaults=not shipped_only,
        metadata={"items_file": cloze_items} if cloze_items else None,
    )


def _task_manager_for(tasks: Sequence[str], cloze_items: Path | None = None):
    shipped = {path.stem for path in TASKS_DIR.glob("*.yaml")}  # file name = task name
    return _task_manager(
        all(task in shipped for task in tasks), str(cloze_items) if cloze_items else None
    )


def run_harness(
    model,
    tokenizer,
    tasks: Sequence[str] | None,
    limit: int | None,
    batch_size: int,
    seed: int,
    cloze_items: Path | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {acc, acc_stderr, (acc_norm, acc_norm_stderr)}} for a loaded model, zero-shot;
    nothing for no tasks. `cloze_items`: the llmpipe_cloze task's items file."""
    if not tasks:
        return {}
    import os

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # Hub tasks download unless the machine is offline.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = next(model.parameters()).device
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(device),
        max_length=getattr(model.config, "max_position_embeddings", None),
    )
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=_task_manager_for(tasks, cloze_items),
        limit=limit,
        log_samples=False,
        bootstrap_iters=1000,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        verbosity="ERROR",
    )
    figures = {}
    for task in tasks:
        result = out["results"][task]
        figures[task] = {
            f"{name}{suffix}": float(result[f"{name}{suffix},none"])
            for name in METRICS
            for suffix in ("", "_stderr")
            if f"{name}{suffix},none" in result
        }
    return figures
