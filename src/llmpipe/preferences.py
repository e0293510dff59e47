"""Preference data: prompts, sampled completions, and chosen/rejected pairs.

Default (offline): prompts are the opening tokens of paragraphs of the finetune corpus
(train prompts from its train split, held-out prompts from its val split, so no held-out
prompt was ever trained on); the finetuned policy samples several completions per prompt; a gold
scorer picks the best as chosen and the worst as rejected; prompts whose completions all score
the same are ties and are dropped. Or a ready preference set with prompt/chosen/rejected columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmpipe.data import TokenBin
from llmpipe.errors import DataError
from llmpipe.gold import GoldScorer

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def prompts_from_tokens(bins: TokenBin, tokenizer, prompt_tokens: int, count: int,
                        seed: int, min_paragraph_tokens: int) -> list[str]:
    """`count` distinct prompts: the first `prompt_tokens` tokens of paragraphs (of at least
    `min_paragraph_tokens` tokens) of the documents in `bins`, drawn with a seeded RNG."""
    tokens = np.asarray(bins.tokens)
    bounds = np.flatnonzero(tokens == bins.eot_id)
    starts = np.concatenate([[0], bounds + 1])[:len(bounds)]
    candidates: list[str] = []
    for start, end in zip(starts, bounds, strict=True):
        text = tokenizer.decode(tokens[start:end].tolist())
        for paragraph in text.split("\n\n"):
            ids = tokenizer(paragraph.strip(), add_special_tokens=False).input_ids
            if len(ids) >= min_paragraph_tokens:
                candidates.append(tokenizer.decode(ids[:prompt_tokens]))
    candidates = sorted(set(candidates))
    if len(candidates) < count:
        raise DataError(f"{bins.path}: only {len(candidates)} distinct paragraph openings of "
                        f"{prompt_tokens} tokens for {count} prompts; ask for fewer prompts")
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return [candidates[i] for i in sorted(chosen)]


@dataclass(frozen=True)
class Completion:
    text: str
    ids: list[int]  # generated token ids, up to (not including) the end of text
    stopped: bool = False  # the model generated the end of text (a choice that has a probability)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int,
                       temperature: float, top_k: int | None, seed: int,
                       batch_size: int = 64, top_p: float | None = None
                       ) -> list[list[Completion]]:
    """`n` completions per prompt, sampled (greedy at temperature 0), reproducible from
    `seed` (on CPU)."""
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": top_k or 0,
                 "top_p": top_p or 1.0} if temperature > 0 else {"do_sample": False})
    out: list[list[Completion]] = []
    for i in range(0, len(prompts), batch_size):
        # Left padding: generation continues the last token of every row.
        batch = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                          padding_side="left", add_special_tokens=False).to(device)
        generated = model.generate(**batch, **sampling, max_new_tokens=max_new_tokens,
                                   num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
        new = generated[:, batch.input_ids.size(1):].tolist()
        for row in range(0, len(new), n):
            group = []
            for ids in new[row:row + n]:
                stopped = tokenizer.eos_token_id in ids
                if stopped:
                    ids = ids[:ids.index(tokenizer.eos_token_id)]
                group.append(Completion(tokenizer.decode(ids, skip_special_tokens=True), ids,
                                        stopped))
            out.append(group)
    return out


def gold_pairs(prompts: Sequence[str], completions: Sequence[Sequence[Completion]],
               gold: GoldScorer, pairs_per_prompt: int = 1) -> tuple[list[dict], int]:
    """Pairs by gold score: the best completion of each prompt against the worst, then the
    second best against the second worst, ...; a pair whose scores are equal is dropped.
    Returns (pairs, ties), ties counting the prompts that gave no pair at all."""
    scores = gold([c.text for group in completions for c in group])
    pairs, ties, k = [], 0, 0
    for prompt, group in zip(prompts, completions, strict=True):
        group_scores = scores[k:k + len(group)]
        k += len(group)
        order = np.argsort(group_scores, kind="stable")
        found = 0
        for j in range(min(pairs_per_prompt, len(group) // 2)):
            best, worst = int(order[-1 - j]), int(order[j])
            if group_scores[best] > group_scores[worst]:
                pairs.append({"prompt": prompt, "chosen": group[best].text,
                              "rejected": group[worst].text,
                              "chosen_gold": group_scores[best],
                              "rejected_gold": group_scores[worst]})
                found += 1
        ties += found == 0
    return pairs, ties


def load_preference_set(source: str, split: str) -> list[dict]:
    from llmpipe.corpus import load_records, require_columns

    records, columns = load_records(source, split)
    require_columns(columns, PAIR_COLUMNS, source,
                    "a preference set needs prompt, chosen and rejected columns")
    pairs = [{c: r[c] for c in PAIR_COLUMNS} for r in records]
    for i, pair in enumerate(pairs):
        if not all(isinstance(v, str) for v in pair.values()):
            raise DataError(f"{source}: row {i} has non-text prompt/chosen/rejected (a chat "
                            "format? give plain text columns)")
    if not pairs:
        raise DataError(f"{source}: no rows")
    return pairs
