"""RLHF with TRL: a reward model trained on preference pairs, then GRPO against it.

Both trainers' defaults that changed across TRL versions (and default bf16 and gradient
checkpointing on, even on CPU) are set explicitly here or from params.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from llmpipe.data.chat import PromptFormat, right_padded
from llmpipe.model.loading import load_reward_model, load_tokenizer
from llmpipe.rl.degeneration import distinct_n, repeated_ngram_share, word_shares
from llmpipe.rl.gold import GoldScorer
from llmpipe.rl.judges import Judge, load_heldout_judges
from llmpipe.rl.params import RewardModelParams
from llmpipe.rl.preferences import read_gold_spec
from llmpipe.rl.sampling import Sampling, sample_completions
from llmpipe.runtime import per_process, runtime_args, trained_model
from llmpipe.stage import end_distributed


@dataclass(frozen=True)
class Judges:
    """What a policy's held-out completions are scored by: the gold scorer the preferences were
    labelled with, the trained reward model, and the reference policy (for KL)."""

    gold: GoldScorer
    reward_model: torch.nn.Module
    reward_tokenizer: object
    reference: torch.nn.Module
    prompt_format: PromptFormat  # the preference set's: how prompts are sampled and scored
    heldout: dict[str, Judge]  # judges no RL stage optimises (llmpipe.rl.judges)

    def reward_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return reward_scores(
            self.reward_model, self.reward_tokenizer, self.prompt_format, prompts, completions
        )


def load_judges(preferences_dir: Path, reward_dir: Path, reference) -> Judges:
    reward_tokenizer = load_tokenizer(reward_dir)
    return Judges(
        read_gold_spec(preferences_dir).load(),
        load_reward_model(reward_dir, reward_tokenizer),
        reward_tokenizer,
        reference,
        PromptFormat.read(preferences_dir),
        load_heldout_judges(),
    )


@torch.no_grad()
def reward_scores(
    model,
    tokenizer,
    prompt_format: PromptFormat,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 64,
) -> list[float]:
    """The reward model's score of each prompt + completion, read from the tokens it was
    trained on (`PromptFormat.scored_ids`)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [
        prompt_format.scored_ids(tokenizer, q, c) for q, c in zip(prompts, completions, strict=True)
    ]
    scores: list[float] = []
    for i in range(0, len(rows), batch_size):
        inputs = right_padded(rows[i : i + batch_size], tokenizer.pad_token_id, device)
        scores += model(**inputs).logits[:, 0].float().tolist()
    return scores


def pairwise_report(model, tokenizer, prompt_format: PromptFormat, pairs: Sequence[dict]) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin on preference pairs."""
    prompts = [p["prompt"] for p in pairs]
    chosen = reward_scores(model, tokenizer, prompt_format, prompts, [p["chosen"] for p in pairs])
    rejected = reward_scores(
        model, tokenizer, prompt_format, prompts, [p["rejected"] for p in pairs]
    )
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "correct": [float(m > 0) for m in margins],  # per pair: the accuracy's items
        "margins": margins,
    }


def gold_agreement(
    model, tokenizer, prompt_format: PromptFormat, fresh: Sequence[dict]
) -> list[float]:
    """Whether the reward model orders two fresh completions as the gold scorer does, per pair
    (1.0 or 0.0; pairs the gold scorer ties are left out): their mean is the agreement."""
    rows = [r for r in fresh if r["gold"][0] != r["gold"][1]]
    prompts = [r["prompt"] for r in rows]
    a, b = (
        reward_scores(model, tokenizer, prompt_format, prompts, [r["completions"][i] for r in rows])
        for i in (0, 1)
    )
    return [
        float((x > y) == (r["gold"][0] > r["gold"][1])) for x, y, r in zip(a, b, rows, strict=True)
    ]


def train_reward_model(
    policy_dir: Path,
    train_pairs: Sequence[dict],
    eval_pairs: Sequence[dict],
    prompt_format: PromptFormat,
    p: RewardModelParams,
    seed: int,
    live_dir: Path,
):
    """Returns (model (None outside the main process), tokenizer, pairs trained on:
    RewardTrainer drops pairs over max_length). The pairs go in tokenized as `reward_scores`
    reads them (`PromptFormat.scored_ids`), not as RewardTrainer would tokenize them."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from llmpipe.train.callbacks import TrainerCurves

    set_seed(seed)  # the new score head is initialised from the seed
    tokenizer = load_tokenizer(policy_dir)
    model = load_reward_model(policy_dir, tokenizer)
    work_dir = tempfile.mkdtemp(prefix="llmpipe-reward-")
    args = RewardConfig(
        output_dir=work_dir,
        num_train_epochs=p.epochs,
        per_device_train_batch_size=per_process(p.batch_size, "reward_model.batch_size"),
        per_device_eval_batch_size=per_process(p.batch_size, "reward_model.batch_size"),
        learning_rate=p.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=p.warmup_steps,
        max_length=p.max_length,  # longer pairs would be dropped, not truncated
        gradient_checkpointing=False,  # defaults on; pointless for small models
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=5,
        **runtime_args(seed),
    )

    def tokenized(pairs):
        return Dataset.from_list(
            [
                {
                    f"{side}_ids": prompt_format.scored_ids(tokenizer, q["prompt"], q[side])
                    for side in ("chosen", "rejected")
                }
                for q in pairs
            ]
        )

    try:
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=tokenized(train_pairs),
            eval_dataset=tokenized(eval_pairs),
            processing_class=tokenizer,
            callbacks=[TrainerCurves(live_dir)],
        )
        trainer.train()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    model = trained_model(trainer, lambda: load_reward_model(policy_dir, tokenizer))
    trained_pairs = len(trainer.train_dataset)
    del trainer  # its DDP wrapper holds the process group
    end_distributed()  # before any writing (runtime.writes_outputs)
    return model, tokenizer, trained_pairs


# Logits a batch of completion_logprobs may hold (rows x tokens x vocabulary, float32: 1 GiB).
LOGPROB_BATCH_LOGITS = 2**28


@torch.no_grad()
def completion_logprobs(
    model,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    temperature: float = 1.0,
    max_rows: int = 32,
) -> list[float]:
    """Sum of log p(completion token | prefix) per sequence, under the model's distribution
    at the sampling temperature (as TRL computes its log-ratios). Sequences of similar length
    go through the model together, right-padded: the padding comes after every real token, so
    no real token attends to it or moves position."""
    model.eval()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size  # (an int8 head has no float weight to read it from)
    sums = [0.0] * len(prompt_ids)
    order = sorted(
        (i for i, completion in enumerate(completion_ids) if completion),
        key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]),
    )
    while order:
        width = len(prompt_ids[order[0]]) + len(completion_ids[order[0]])
        rows = []
        for i in order:
            longest = max(width, len(prompt_ids[i]) + len(completion_ids[i]))
            if rows and (len(rows) == max_rows or
                         (len(rows) + 1) * longest * vocab > LOGPROB_BATCH_LOGITS):  # fmt: skip
                break
            rows.append(i)
            width = longest
        order = order[len(rows) :]
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            sequence = prompt_ids[i] + completion_ids[i]
            ids[r, : len(sequence)] = torch.tensor(sequence)
            mask[r, : len(sequence)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        logprobs = F.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
        token_lp = logprobs.gather(-1, ids[:, 1:, None])[..., 0]
        for r, i in enumerate(rows):
            start = len(prompt_ids[i]) - 1
            sums[i] = token_lp[r, start : start + len(completion_ids[i])].sum().item()
    return sums


def policy_report(
    policy, tokenizer, prompts: Sequence[str], sampling: Sampling, judges: Judges
) -> dict:
    """Reward-model score, gold score, KL to the reference (a Monte-Carlo estimate on the
    policy's own samples) and mean length of completions sampled from `policy`."""
    groups = sample_completions(policy, tokenizer, prompts, sampling, judges.prompt_format)
    flat_prompts = [q for q, g in zip(prompts, groups, strict=True) for _ in g]
    completions = [c for g in groups for c in g]
    prompt_ids = [judges.prompt_format.prompt_ids(tokenizer, q) for q in flat_prompts]
    # Stopping is a choice too: a completion that ended includes its end-of-text token.
    completion_ids = [c.ids + [tokenizer.eos_token_id] * c.stopped for c in completions]
    policy_lp = completion_logprobs(policy, prompt_ids, completion_ids, sampling.temperature)
    reference_lp = completion_logprobs(
        judges.reference, prompt_ids, completion_ids, sampling.temperature
    )
    n, every = len(completions), sampling.n
    texts = [c.text for c in completions]
    rm_scores = judges.reward_scores(flat_prompts, texts)
    gold_scores = judges.gold(texts)
    kl = [a - b for a, b in zip(policy_lp, reference_lp, strict=True)]
    lengths = [len(c.ids) for c in completions]
    heldout = {name: judge(texts) for name, judge in judges.heldout.items()}
    return {
        "reward_model_score": sum(rm_scores) / n,
        "gold_score": sum(gold_scores) / n,
        "kl_to_reference": sum(kl) / n,
        "completion_length": sum(lengths) / n,
        **{name: sum(scores) / n for name, scores in heldout.items()},
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_3gram_share": repeated_ngram_share(texts, 3),
        # fluency: nats per token of the completions under the reference (SFT) policy
        "reference_loss": -sum(reference_lp) / max(sum(len(ids) for ids in completion_ids), 1),
        "samples": [
            {"prompt": q, "completion": c.text}  # one per prompt, of the first four
            for q, c in zip(
                flat_prompts[: every * 4 : every], completions[: every * 4 : every], strict=True
            )
        ],
        # the words most completions use, with the share of completions that use them
        "word_shares": word_shares(texts),
        # per prompt, its completions averaged: the items the intervals are computed from
        "items": [
            {
                "prompt": q,
                **{
                    key: sum(values[i * every : (i + 1) * every]) / every
                    for key, values in (
                        ("reward_model_score", rm_scores),
                        ("gold_score", gold_scores),
                        ("kl_to_reference", kl),
                        ("completion_length", lengths),
                        *heldout.items(),
                    )
                },
            }
            for i, q in enumerate(prompts)
        ],
    }
