"""Where every artifact of the pipeline lives: the one home of its paths.

Stages and the library take their paths from here; `dvc.yaml` spells the same paths out for
DVC, and tests/test_dvc_yaml.py checks that the two agree stage by stage (what each stage
reads and writes, below in STAGES). Paths are relative to the repository root, where DVC runs
every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")  # DVC outputs, not in git
METRICS = Path("metrics")  # small JSON files, in git
LIVE = Path("dvclive")  # training curves, in git

CORPORA = ("pretrain", "finetune")

RAW = DATA / "raw"
TOKENIZER = DATA / "tokenizer"
TOKENS = DATA / "tokens"
PRETRAIN_MODEL = DATA / "pretrain/model"
# A killed pretrain run resumes from here. Scratch, like scratch_dir, and no output: DVC neither
# deletes it before a rerun nor caches it, and a clone that pulled the outputs does not miss it.
PRETRAIN_CHECKPOINT = DATA / "pretrain/checkpoint"
FINETUNE_MODEL = DATA / "finetune/model"
LORA_ADAPTER = DATA / "lora/adapter"
LORA_MERGED = DATA / "lora/merged"
QUANTIZED_MODEL = DATA / "quantize/model"
GGUF = DATA / "gguf"  # <model>-<file type>.gguf (export.gguf)
PREFERENCES = DATA / "preferences"
REWARD_MODEL = DATA / "reward_model/model"
# The finetuned policy measured once on the held-out prompts: grpo's and reinforce's "before".
RL_BASELINE = DATA / "rl_baseline"
GRPO_MODEL = DATA / "grpo/model"
REINFORCE_MODEL = DATA / "reinforce/model"
# The checkable task's branch: problems, then SFT, then RL from the SFT model two ways.
TASK_PROBLEMS = DATA / "task/problems"
TASK_SFT_MODEL = DATA / "task/sft/model"
TASK_REINFORCE_MODEL = DATA / "task/reinforce/model"
TASK_GRPO_MODEL = DATA / "task/grpo/model"
# samples.json: each model's generations for the report; items.json: per model, what its figures
# are computed from; cloze.jsonl: the harness task's items (llmpipe.evaluation.cloze)
EVALUATE_SAMPLES = DATA / "evaluate"
REPORT = DATA / "report"  # report.md with its images
EVALUATE_MODELS = METRICS / "evaluate_models.json"  # one row per model: dvc.yaml's bar plots
# The random-reward control of the task's RL stages, a DVC experiment's results recorded by
# `python -m llmpipe.control`: in git, written by no stage, read by the report card.
TASK_CONTROL = METRICS / "task_control.json"


def raw_corpus(corpus: str) -> Path:
    """A directory of JSONL shards (llmpipe.data.corpus)."""
    return RAW / corpus


def tokens(corpus: str) -> Path:
    return TOKENS / corpus


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def items_file(stage: str) -> Path:
    """A measuring stage's per-item results (per prompt, per problem), before and after: the
    rows its figures and their intervals are computed from. Small, and kept in git beside the
    metrics, so that another revision's can be paired with them (dvc.yaml declares each as a
    scatter plot: every item before against after)."""
    return METRICS / "items" / f"{stage}.json"


def live_dir(stage: str) -> Path:
    """Where dvclive writes a stage's curves."""
    return LIVE / stage


def curves_dir(stage: str) -> Path:
    """The curve files inside live_dir (TSV per metric): what dvc.yaml declares as plots."""
    return live_dir(stage) / "plots/metrics"


# The held-out figures GRPO and REINFORCE log as curves during training (curves_dir(stage) /
# "heldout" / "<figure>.tsv"), which the report card plots.
HELDOUT_CURVES = ("gold_score", "reward_model_score", "kl_to_reference")


def scratch_dir(stage: str) -> Path:
    """Trainer checkpoints while a stage runs: deleted when it ends, never an output."""
    return DATA / stage / "trainer"


@dataclass(frozen=True)
class StageFiles:
    """What one stage reads and writes besides its code and params (dvc.yaml's data deps and
    outs). Every stage also writes metrics_file(stage)."""

    reads: tuple[Path, ...]
    writes: tuple[Path, ...]
    curves: bool = False  # writes curves_dir(stage)
    in_git: tuple[Path, ...] = ()  # further outputs kept in git, not in DVC's cache
    metrics: bool = True  # writes metrics_file(stage)

    def git_outputs(self, stage: str) -> tuple[Path, ...]:
        """Outputs that live in git (cache: false): what `git checkout` brings back."""
        return (
            *((metrics_file(stage),) if self.metrics else ()),
            *self.in_git,
            *((curves_dir(stage),) if self.curves else ()),
        )


MODEL_OUTPUTS = {  # the models evaluate compares, by the name the report gives them
    "pretrain": PRETRAIN_MODEL,
    "finetune": FINETUNE_MODEL,
    "lora": LORA_MERGED,
    "quantized": QUANTIZED_MODEL,
    "grpo": GRPO_MODEL,
    "reinforce": REINFORCE_MODEL,
}
STAGES: dict[str, StageFiles] = {
    "download": StageFiles(reads=(), writes=(RAW,)),
    "tokenize": StageFiles(reads=(RAW,), writes=(TOKENIZER, TOKENS)),
    "pretrain": StageFiles(
        reads=(tokens("pretrain"), TOKENIZER),
        writes=(PRETRAIN_MODEL,),
        curves=True,
        in_git=(items_file("pretrain"),),
    ),
    "finetune": StageFiles(
        reads=(tokens("finetune"), PRETRAIN_MODEL),
        writes=(FINETUNE_MODEL,),
        curves=True,
        in_git=(items_file("finetune"),),
    ),
    "lora": StageFiles(
        reads=(tokens("finetune"), PRETRAIN_MODEL),
        writes=(LORA_ADAPTER, LORA_MERGED),
        curves=True,
        in_git=(items_file("lora"),),
    ),
    "quantize": StageFiles(
        reads=(tokens("finetune"), FINETUNE_MODEL, LORA_MERGED),
        writes=(QUANTIZED_MODEL,),
        in_git=(items_file("quantize"),),
    ),
    "preferences": StageFiles(reads=(tokens("finetune"), FINETUNE_MODEL), writes=(PREFERENCES,)),
    "reward_model": StageFiles(
        reads=(PREFERENCES, FINETUNE_MODEL),
        writes=(REWARD_MODEL,),
        curves=True,
        in_git=(items_file("reward_model"),),
    ),
    "rl_baseline": StageFiles(
        reads=(PREFERENCES, REWARD_MODEL, FINETUNE_MODEL), writes=(RL_BASELINE,)
    ),
    "grpo": StageFiles(
        reads=(PREFERENCES, REWARD_MODEL, FINETUNE_MODEL, RL_BASELINE),
        writes=(GRPO_MODEL,),
        curves=True,
        in_git=(items_file("grpo"),),
    ),
    "reinforce": StageFiles(
        reads=(PREFERENCES, REWARD_MODEL, FINETUNE_MODEL, RL_BASELINE),
        writes=(REINFORCE_MODEL,),
        curves=True,
        in_git=(items_file("reinforce"),),
    ),
    "task_sft": StageFiles(
        reads=(PRETRAIN_MODEL,),
        writes=(TASK_PROBLEMS, TASK_SFT_MODEL),
        curves=True,
        in_git=(items_file("task_sft"),),
    ),
    "task_reinforce": StageFiles(
        reads=(TASK_PROBLEMS, TASK_SFT_MODEL),
        writes=(TASK_REINFORCE_MODEL,),
        curves=True,
        in_git=(items_file("task_reinforce"),),
    ),
    "task_grpo": StageFiles(
        reads=(TASK_PROBLEMS, TASK_SFT_MODEL),
        writes=(TASK_GRPO_MODEL,),
        curves=True,
        in_git=(items_file("task_grpo"),),
    ),
}
# llama.cpp's files of the trained models; evaluate and the report read none of them, so a
# change here reruns only this stage (and the report, which lists every stage's metrics).
STAGES["gguf"] = StageFiles(
    reads=(PRETRAIN_MODEL, FINETUNE_MODEL, LORA_MERGED, GRPO_MODEL, REINFORCE_MODEL),
    writes=(GGUF,),
)
# evaluate measures every model on the same data; the report card then gathers its table,
# every stage's metrics and the training curves, and measures nothing: a new timing in a
# stage's perf block, or a changed param, reruns only the report.
STAGES["evaluate"] = StageFiles(
    reads=(TOKENS, PREFERENCES, REWARD_MODEL, *MODEL_OUTPUTS.values()),
    writes=(EVALUATE_SAMPLES,),
    in_git=(EVALUATE_MODELS,),
)
STAGES["report"] = StageFiles(
    reads=(
        EVALUATE_SAMPLES,
        EVALUATE_MODELS,
        *(metrics_file(stage) for stage in STAGES if stage != "download"),
        *(curves_dir(stage) for stage, files in STAGES.items() if files.curves),
        # the checker's per-problem results, paired with the control's
        items_file("task_reinforce"),
        items_file("task_grpo"),
        TASK_CONTROL,
    ),
    writes=(REPORT,),
    metrics=False,
)
