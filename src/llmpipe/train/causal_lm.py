"""Causal-LM finetuning on token memmaps with transformers' Trainer.

The finetune stage (every weight) and the lora stage (a peft adapter) share all of it: the
base model, the check that base and token data share a vocabulary, the datasets of windows,
the Trainer with warmup + cosine, early stopping on a selection split (the best checkpoint is
the one kept), the curves, and the perplexity on fixed validation windows, measured the same way
as for pretrain.

The checkpoint is chosen on the train split's last documents (`selection_fraction`), never on
the validation windows that are reported: a step picked for its score on the reported windows
would make that score look better than the model is.
"""

from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmpipe import layout
from llmpipe.data.tokens import TokenBin
from llmpipe.errors import DataError, ParamsError
from llmpipe.evaluation.intervals import write_items
from llmpipe.evaluation.scores import (
    WindowScore,
    loss_change_metrics,
    perplexity,
    token_byte_lengths,
    window_scores,
)
from llmpipe.model.loading import load_causal_lm, token_vocab_size
from llmpipe.runtime import (
    checkpointing_args,
    default_device,
    fp32_master_weights,
    per_process,
    runtime_args,
    sharded_launch,
    trained_model,
    use_cuda,
    wait_for_everyone,
    warn_if_slow_bf16,
    world_size,
    writes_outputs,
)
from llmpipe.stage import end_distributed
from llmpipe.train.callbacks import TrainerCurves
from llmpipe.train.params import CausalLMTrainingParams


def open_token_data(
    tokens_dir: Path, model, tokenizer, base_spec: str
) -> tuple[TokenBin, TokenBin]:
    """Train and val memmaps, checked against the model's vocabulary before any training."""
    vocab = token_vocab_size(model, tokenizer)
    try:
        return (
            TokenBin.open(tokens_dir, "train", expected_vocab_size=vocab),
            TokenBin.open(tokens_dir, "val", expected_vocab_size=vocab),
        )
    except DataError as e:
        raise DataError(f"{e} (base {base_spec!r})") from e


def selection_split(
    train_bin: TokenBin, p: CausalLMTrainingParams, stage: str
) -> tuple[TokenBin, TokenBin]:
    """(train, selection): the train split without its last documents, and those documents,
    which the best checkpoint is chosen on."""
    train, selection = train_bin.split_tail(p.selection_fraction)
    for part, name in ((train, "train"), (selection, "selection")):
        if len(part) < p.block_size + 1:
            raise ParamsError(
                f"{stage}.selection_fraction: {p.selection_fraction} of {train_bin.path}'s "
                f"{len(train_bin)} tokens leaves {len(part)} for {name}, fewer than one window "
                f"of block_size + 1 = {p.block_size + 1}"
            )
    return train, selection


def check_block_size(model, block_size: int, key: str) -> None:
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and block_size > max_positions:
        raise ParamsError(f"{key}: {block_size} is more than the base's {max_positions} positions")


class WindowDataset(torch.utils.data.Dataset):
    """Windows of block_size tokens as Trainer examples (labels = inputs: the model shifts)."""

    def __init__(self, bins: TokenBin, block_size: int, starts: list[int]):
        self.bins, self.block_size, self.starts = bins, block_size, starts

    @classmethod
    def tiling(cls, bins: TokenBin, block_size: int) -> WindowDataset:
        """Non-overlapping windows covering the split: each token is seen once per epoch."""
        bins.check_block(block_size)
        return cls(bins, block_size, list(range(0, len(bins) - block_size, block_size)))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, _ = self.bins.window(self.starts[i], self.block_size)
        labels = x.clone()
        # The model shifts labels, so the first is never a target; the Trainer still counts it
        # when it normalises the loss (sum / labels != -100), which would scale every loss by
        # (T-1)/T. Masking it makes the Trainer's loss the true mean over predicted tokens.
        labels[0] = -100
        # Windows hold end-of-text ids (= pad id for GPT-2): an explicit mask says nothing is
        # padding.
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}


@dataclass
class TrainResult:
    model: torch.nn.Module | None  # the best checkpoint's weights (main process; else None)
    steps: int
    best_step: int
    train_loss: float
    eval_losses: list[tuple[int, float]]  # (step, Trainer eval_loss) at every evaluation
    tokens_per_s: float
    peak_memory_mb: float


def train(
    model,
    p: CausalLMTrainingParams,
    seed: int,
    train_bin: TokenBin,
    selection_bin: TokenBin,
    work_dir: Path,
    live_dir: Path,
    accumulation: int,
    rebuild: Callable[[], torch.nn.Module] | None = None,
) -> TrainResult:
    """Train with early stopping on `selection_bin`'s windows and return the best checkpoint's
    model (in the main process; None in the others). `accumulation` is this process's share of
    p.grad_accum_steps (per_process); `rebuild()` makes `model` afresh, to hold the gathered
    weights of a sharded run (FSDP, DeepSpeed: runtime.trained_model)."""
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    if writes_outputs():  # the one that saves Trainer checkpoints
        shutil.rmtree(work_dir, ignore_errors=True)  # a crashed run's must not rotate in
        if not use_cuda("auto"):
            warn_if_slow_bf16(p.dtype, "cpu", f"{p.SECTION}.dtype")
    curves = TrainerCurves(live_dir)
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=p.max_steps,
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=p.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=p.warmup_steps,
        weight_decay=p.weight_decay,
        eval_strategy="steps",
        eval_steps=p.eval_interval,
        save_strategy="steps",
        save_steps=p.eval_interval,
        # The weights alone, except for a sharded model: its best checkpoint is reloaded at the
        # end through FSDP's or DeepSpeed's own state (transformers refuses weights alone then).
        save_only_model=not sharded_launch(),
        save_total_limit=2,  # the best is always kept on top of the latest
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, p.eval_interval // 5),
        **checkpointing_args(p.gradient_checkpointing),
        **runtime_args(seed, p.dtype == "bfloat16"),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=WindowDataset.tiling(train_bin, p.block_size),
        eval_dataset=WindowDataset(
            selection_bin, p.block_size, selection_bin.eval_starts(p.block_size, p.eval_windows)
        ),
        callbacks=[
            EarlyStoppingCallback(early_stopping_patience=p.early_stopping_patience),
            curves,
        ],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train()
    state = trainer.state
    eval_losses = [(r["step"], r["eval_loss"]) for r in state.log_history if "eval_loss" in r]
    best_step = min(eval_losses, key=lambda se: se[1])[0]
    tokens = state.global_step * p.batch_size * p.grad_accum_steps * p.block_size
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    trained = trained_model(trainer, rebuild)
    wait_for_everyone()  # every process has loaded the best checkpoint
    del trainer  # its DDP wrapper holds the process group
    end_distributed()  # before any writing (runtime.writes_outputs)
    if writes_outputs():
        shutil.rmtree(work_dir, ignore_errors=True)
        trained.config.use_cache = True  # the Trainer turns the KV cache off for training
    return TrainResult(
        model=trained,
        steps=state.global_step,
        best_step=best_step,
        train_loss=output.training_loss,
        eval_losses=eval_losses,
        tokens_per_s=tokens / curves.step_seconds if curves.step_seconds else 0.0,
        peak_memory_mb=peak_mb,
    )


def val_perplexity(model, val_bin: TokenBin, p: CausalLMTrainingParams) -> float:
    return perplexity(val_score(model, val_bin, p).loss)


def val_score(
    model, val_bin: TokenBin, p: CausalLMTrainingParams, token_bytes: torch.Tensor | None = None
) -> WindowScore:
    return window_scores(model, val_bin, p.block_size, p.eval_windows, p.batch_size, token_bytes)


@dataclass
class StageRun:
    """One finetune-like stage: the base, its data, the training and the before/after (the
    scores are measured by the main process only, None on the others)."""

    result: TrainResult
    tokenizer: object
    base_score: WindowScore | None
    score: WindowScore | None
    started: float

    @property
    def base_perplexity(self) -> float:
        return perplexity(self.base_score.loss)

    @property
    def perplexity(self) -> float:
        return perplexity(self.score.loss)

    def write_items(self, stage: str) -> None:
        """The validation loss per window, of the base and after (layout.items_file)."""
        write_items(
            layout.items_file(stage),
            {"items": self.base_score.items()},
            {"items": self.score.items()},
        )

    def metrics(self, base_spec: str) -> dict:
        return {
            "base": base_spec,
            **self.base_score.perplexity_metrics("base_val_perplexity"),
            **self.score.perplexity_metrics(),
            # paired over the same windows: below 0, the stage helped
            **loss_change_metrics(self.base_score, self.score, "val_loss_change"),
            "base_val_bits_per_byte": self.base_score.bits_per_byte,
            "val_bits_per_byte": self.score.bits_per_byte,
            "train_loss": self.result.train_loss,
            "steps": self.result.steps,
            "best_step": self.result.best_step,
            "perf": {
                "tokens_per_s": self.result.tokens_per_s,
                "peak_memory_mb": self.result.peak_memory_mb,
                "wall_s": time.perf_counter() - self.started,
                "processes": world_size(),
                "device": default_device(),
            },
        }


def run_stage(
    stage: str,
    p: CausalLMTrainingParams,
    seed: int,
    tokens_dir: Path,
    work_dir: Path,
    live_dir: Path,
    adapt=None,
) -> StageRun:
    """Load the base (checked against the data before any work), score it, train it (through
    `adapt(model)` when given, e.g. a LoRA wrapper) and score the result on the same windows.
    Under a launcher every process trains; the main one alone scores.

    Trained weights are float32 whatever the base's dtype (a hub model saved in bf16 loads in
    bf16): bf16 is the Trainer's autocast (p.dtype), not the weights'. A full finetune casts
    the base before scoring it, so that both scores use the same weights' precision; a LoRA's
    frozen base keeps its dtype."""
    from transformers import set_seed

    started = time.perf_counter()
    accumulation = per_process(p.grad_accum_steps, f"{stage}.grad_accum_steps")
    set_seed(seed)  # an adapter's initial weights are drawn before the Trainer seeds anything
    model, tokenizer = load_causal_lm(p.base, p.trust_remote_code)
    if adapt is None:  # every weight trains
        fp32_master_weights(model)
    check_block_size(model, p.block_size, f"{stage}.block_size")
    train_bin, val_bin = open_token_data(tokens_dir, model, tokenizer, p.base)
    train_bin, selection_bin = selection_split(train_bin, p, stage)
    main = writes_outputs()
    token_bytes = token_byte_lengths(tokenizer)
    base_score = val_score(model, val_bin, p, token_bytes) if main else None
    adapt = adapt or (lambda base: base)

    def rebuild():
        return fp32_master_weights(adapt(load_causal_lm(p.base, p.trust_remote_code)[0]))

    result = train(
        fp32_master_weights(adapt(model)),
        p,
        seed,
        train_bin,
        selection_bin,
        work_dir,
        live_dir,
        accumulation,
        rebuild,
    )
    return StageRun(
        result,
        tokenizer,
        base_score,
        val_score(result.model, val_bin, p, token_bytes) if main else None,
        started,
    )
