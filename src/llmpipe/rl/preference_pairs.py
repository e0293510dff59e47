"""Preference pairs: prompts, sampled completions, and chosen/rejected by a gold scorer.

Default (offline): prompts are the opening tokens of paragraphs of the finetune corpus
(train prompts from its train split, held-out prompts from its val split, so no held-out
prompt was ever trained on); the finetuned policy samples several completions per prompt; a gold
scorer picks the best as chosen and the worst as rejected; prompts whose completions all score
the same are ties and are dropped. Or a ready preference set with prompt/chosen/rejected columns,
split by prompt.

Prompts that share a stem (their first eight words, lowercased, punctuation and spacing
collapsed) count as one: one of them is kept, and no train prompt shares a stem with a held-out
one. A pair whose two completions are the same text up to case, punctuation and spacing is
dropped like a tie: it teaches the reward model nothing but the gold scorer's noise.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np

from llmpipe.data.chat import PromptFormat
from llmpipe.data.corpus import load_records, require_columns
from llmpipe.data.tokenization import split_by_document
from llmpipe.data.tokens import TokenBin
from llmpipe.errors import DataError
from llmpipe.evaluation.intervals import Estimate, estimate, interval_metrics
from llmpipe.rl.gold import GoldScorer, domain_words, scorer_lexicon
from llmpipe.rl.params import PreferencesParams
from llmpipe.rl.preferences import PAIR_COLUMNS, SPLITS, GoldSpec, PreferenceSet
from llmpipe.rl.sampling import Completion, Sampling, sample_completions

STEM_WORDS = 8


def normalised(text: str) -> list[str]:
    """The words of a text, lowercased, with punctuation and spacing collapsed."""
    return re.sub(r"[\W_]+", " ", text.lower()).split()


def prompt_stem(text: str) -> str:
    return " ".join(normalised(text)[:STEM_WORDS])


def one_per_stem(prompts: Sequence[str], exclude: Collection[str] = ()) -> list[str]:
    """The first prompt of each stem, in order, leaving out the stems in `exclude`."""
    kept: dict[str, str] = {}
    for prompt in prompts:
        if (stem := prompt_stem(prompt)) not in exclude:
            kept.setdefault(stem, prompt)
    return list(kept.values())


def paragraphs(bins: TokenBin, tokenizer) -> Iterator[str]:
    """The paragraphs of the documents in `bins`, decoded."""
    for ids in bins.documents():
        yield from tokenizer.decode(ids.tolist()).split("\n\n")


def gold_spec(p: PreferencesParams, tokens_dir: Path, tokenizer) -> GoldSpec:
    """The gold scorer of params `p`; a lexicon's domain words (preferences.gold_domain_share)
    are found in the finetune corpus's train split, which every RL prompt comes from."""
    neutral: list[str] = []
    if p.gold_domain_share is not None and (words := scorer_lexicon(p.gold_scorer)) is not None:
        train = TokenBin.open(tokens_dir, "train", expected_vocab_size=len(tokenizer))
        neutral = domain_words(
            (q for q in paragraphs(train, tokenizer) if q.strip()), words, p.gold_domain_share
        )
    return GoldSpec(p.gold_scorer, p.gold_label, p.gold_repetition_penalty, tuple(neutral))


def prompts_from_tokens(
    bins: TokenBin,
    tokenizer,
    prompt_tokens: int,
    count: int,
    seed: int,
    min_paragraph_tokens: int,
    exclude_stems: Collection[str] = (),
) -> list[str]:
    """`count` prompts of distinct stems: the first `prompt_tokens` tokens of paragraphs (of at
    least `min_paragraph_tokens` tokens) of the documents in `bins`, none whose stem is in
    `exclude_stems`, drawn with a seeded RNG."""
    candidates: list[str] = []
    for paragraph in paragraphs(bins, tokenizer):
        ids = tokenizer(paragraph.strip(), add_special_tokens=False).input_ids
        if len(ids) >= min_paragraph_tokens:
            candidates.append(tokenizer.decode(ids[:prompt_tokens]))
    candidates = one_per_stem(sorted(set(candidates)), exclude_stems)
    if len(candidates) < count:
        raise DataError(
            f"{bins.path}: only {len(candidates)} paragraph openings of {prompt_tokens} tokens "
            f"with distinct stems for {count} prompts; ask for fewer prompts"
        )
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return [candidates[i] for i in sorted(chosen)]


def gold_margin(pairs: Sequence[dict]) -> Estimate:
    """Chosen minus rejected gold score, paired within each pair; a prompt's pairs averaged
    into one item (they come from one group of samples of that prompt, so they are not
    independent of each other)."""
    margins: dict[str, list[float]] = {}
    for q in pairs:
        margins.setdefault(q["prompt"], []).append(q["chosen_gold"] - q["rejected_gold"])
    return estimate([sum(m) / len(m) for m in margins.values()])


def gold_pairs(
    prompts: Sequence[str],
    completions: Sequence[Sequence[Completion]],
    gold: GoldScorer,
    pairs_per_prompt: int = 1,
) -> tuple[list[dict], int]:
    """Pairs by gold score: the best completion of each prompt against the worst, then the
    second best against the second worst, ...; a pair whose scores are equal, or whose texts
    are the same up to case, punctuation and spacing, is dropped.
    Returns (pairs, ties), ties counting the prompts that gave no pair at all."""
    scores = gold([c.text for group in completions for c in group])
    pairs, ties, k = [], 0, 0
    for prompt, group in zip(prompts, completions, strict=True):
        group_scores = scores[k : k + len(group)]
        k += len(group)
        order = np.argsort(group_scores, kind="stable")
        found = 0
        for j in range(min(pairs_per_prompt, len(group) // 2)):
            best, worst = int(order[-1 - j]), int(order[j])
            same_text = normalised(group[best].text) == normalised(group[worst].text)
            if group_scores[best] > group_scores[worst] and not same_text:
                pairs.append(
                    {
                        "prompt": prompt,
                        "chosen": group[best].text,
                        "rejected": group[worst].text,
                        "chosen_gold": group_scores[best],
                        "rejected_gold": group_scores[worst],
                    }
                )
                found += 1
        ties += found == 0
    return pairs, ties


def load_preference_set(
    source: str, split: str, columns: Sequence[str] = PAIR_COLUMNS
) -> list[dict]:
    """The pairs of a ready set; `columns`: the set's names for prompt, chosen, rejected."""
    records, found = load_records(source, split)
    named = dict(zip(PAIR_COLUMNS, columns, strict=True))
    require_columns(
        found,
        list(named.values()),
        source,
        "set preferences.prompt_column, chosen_column and rejected_column",
    )
    pairs = [{ours: r[theirs] for ours, theirs in named.items()} for r in records]
    for i, pair in enumerate(pairs):
        if not all(isinstance(v, str) for v in pair.values()):
            raise DataError(
                f"{source}: row {i} has non-text {', '.join(named.values())} "
                "(a list of messages? give plain text columns; preferences.chat "
                "puts them in the chat template)"
            )
    if not pairs:
        raise DataError(f"{source}: no rows")
    return pairs


def build_preference_set(
    p: PreferencesParams, seed: int, policy, tokenizer, tokens_dir: Path
) -> tuple[PreferenceSet, dict]:
    """The preference set of params `p` and its metrics: generated by `policy` and labelled by
    the gold scorer (source: generate), or a ready set split by prompt."""
    prompt_format = PromptFormat(p.chat)
    prompt_format.check(tokenizer, "preferences.chat")
    spec = gold_spec(p, tokens_dir, tokenizer)
    gold = spec.load()

    def sample(prompts, n, seed_offset):
        return sample_completions(
            policy,
            tokenizer,
            prompts,
            Sampling(n, p.completion_tokens, p.temperature, seed + seed_offset, top_k=p.top_k),
            prompt_format,
        )

    ties = 0
    if p.source == "generate":
        counts = {"train": p.train_prompts, "heldout": p.heldout_prompts}
        prompts, pairs = {}, {}
        # Held-out first: no train prompt may share a stem with one.
        for split, token_split in (("heldout", "val"), ("train", "train")):
            bins = TokenBin.open(tokens_dir, token_split, expected_vocab_size=len(tokenizer))
            prompts[split] = prompts_from_tokens(
                bins,
                tokenizer,
                p.prompt_tokens,
                counts[split],
                seed,
                min_paragraph_tokens=2 * p.prompt_tokens,
                exclude_stems={prompt_stem(q) for q in prompts.get("heldout", ())},
            )
        for offset, split in enumerate(SPLITS):
            pairs[split], split_ties = gold_pairs(
                prompts[split],
                sample(prompts[split], p.samples_per_prompt, offset),
                gold,
                p.pairs_per_prompt,
            )
            ties += split_ties
    else:  # a ready set: split by prompt, so no held-out prompt is trained on
        ready = load_preference_set(
            p.source, p.split, (p.prompt_column, p.chosen_column, p.rejected_column)
        )
        # One prompt per stem (its every pair), so that no stem is on both sides of the split.
        kept = set(one_per_stem(sorted({q["prompt"] for q in ready})))
        ready = [q for q in ready if q["prompt"] in kept]
        heldout = set(
            split_by_document([q["prompt"] for q in ready], p.heldout_fraction, seed, p.source)[
                "val"
            ]
        )
        pairs = {
            "train": [q for q in ready if q["prompt"] not in heldout],
            "heldout": [q for q in ready if q["prompt"] in heldout],
        }
        prompts = {split: sorted({q["prompt"] for q in rows}) for split, rows in pairs.items()}
    for split, rows in pairs.items():
        if not rows:
            raise DataError(
                f"preferences: no {split} pairs (every prompt's completions tied "
                "on the gold score); raise preferences.samples_per_prompt, "
                "completion_tokens or the number of prompts"
            )

    # Fresh pairs for the reward model's agreement with the gold scorer: new samples on the
    # held-out prompts, scored by the gold scorer, ties kept (the reward model stage skips them).
    fresh_groups = sample(prompts["heldout"], 2, 2)
    fresh_scores = gold([c.text for group in fresh_groups for c in group])
    fresh = [
        {
            "prompt": q,
            "completions": [c.text for c in group],
            "gold": fresh_scores[2 * i : 2 * i + 2],
        }
        for i, (q, group) in enumerate(zip(prompts["heldout"], fresh_groups, strict=True))
    ]

    metrics = {
        "source": p.source,
        "gold_scorer": p.gold_scorer,
        "train_pairs": len(pairs["train"]),
        "heldout_pairs": len(pairs["heldout"]),
        "tie_rate": (
            ties / sum(len(q) for q in prompts.values()) if p.source == "generate" else 0.0
        ),
        "fresh_prompts": len(fresh),
    }
    if p.source == "generate":
        train = pairs["train"]
        metrics["gold_chosen_mean"] = sum(q["chosen_gold"] for q in train) / len(train)
        metrics["gold_rejected_mean"] = sum(q["rejected_gold"] for q in train) / len(train)
        metrics.update(interval_metrics("gold_margin", gold_margin(train)))
    metrics["gold_neutral_words"] = len(spec.neutral_words)
    return PreferenceSet(pairs, prompts, fresh, spec, prompt_format), metrics
