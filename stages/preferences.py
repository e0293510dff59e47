"""preferences: prompts from the finetune corpus, completions from the finetuned policy, and
chosen/rejected pairs labelled by the gold scorer (or a ready preference set)."""

from pathlib import Path

from llmpipe.causal_lm import load_base
from llmpipe.data import TokenBin
from llmpipe.errors import DataError
from llmpipe.gold import load_gold_scorer
from llmpipe.io import write_json, write_jsonl, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.preferences import (
    gold_pairs,
    load_preference_set,
    prompts_from_tokens,
    sample_completions,
)
from llmpipe.stage import run_main
from llmpipe.tokenization import split_by_document

POLICY_DIR = Path("data/finetune/model")
TOKENS_DIR = Path("data/tokens/finetune")
OUT_DIR = Path("data/preferences")


def main() -> None:
    shared, p = load_stage_params("preferences")
    gold = load_gold_scorer(p.gold_scorer, p.gold_label)
    policy, tokenizer = load_base(str(POLICY_DIR))

    def sample(prompts, n, seed_offset):
        return sample_completions(policy, tokenizer, prompts, n, p.completion_tokens,
                                  p.temperature, p.top_k, shared.seed + seed_offset)

    ties = 0
    if p.source == "generate":
        bins = {split: TokenBin.open(TOKENS_DIR, split, expected_vocab_size=len(tokenizer))
                for split in ("train", "val")}
        prompts = {name: prompts_from_tokens(bins[split], tokenizer, p.prompt_tokens, count,
                                             shared.seed, min_paragraph_tokens=2 * p.prompt_tokens)
                   for name, split, count in (("train", "train", p.train_prompts),
                                              ("heldout", "val", p.heldout_prompts))}
        pairs = {}
        for offset, name in enumerate(("train", "heldout")):
            pairs[name], name_ties = gold_pairs(
                prompts[name], sample(prompts[name], p.samples_per_prompt, offset), gold,
                p.pairs_per_prompt)
            ties += name_ties
    else:  # a ready set: split by prompt, so no held-out prompt is trained on
        ready = load_preference_set(p.source, p.split)
        heldout = set(split_by_document([q["prompt"] for q in ready], p.heldout_fraction,
                                        shared.seed, p.source)["val"])
        pairs = {"train": [q for q in ready if q["prompt"] not in heldout],
                 "heldout": [q for q in ready if q["prompt"] in heldout]}
        prompts = {name: sorted({q["prompt"] for q in rows}) for name, rows in pairs.items()}

    for name, rows in pairs.items():
        if not rows:
            raise DataError(f"preferences: no {name} pairs (every prompt's completions tied "
                            "on the gold score); raise preferences.samples_per_prompt, "
                            "completion_tokens or the number of prompts")

    # Fresh pairs for the reward model's agreement with the gold scorer: new samples on the
    # held-out prompts, scored by the gold scorer, ties kept (the reward model stage skips them).
    fresh_groups = sample(prompts["heldout"], 2, 2)
    fresh_scores = gold([c.text for group in fresh_groups for c in group])
    fresh = [{"prompt": q, "completions": [c.text for c in group],
              "gold": fresh_scores[2 * i:2 * i + 2]}
             for i, (q, group) in enumerate(zip(prompts["heldout"], fresh_groups, strict=True))]

    for name in ("train", "heldout"):
        write_jsonl(OUT_DIR / f"{name}.jsonl", pairs[name])
        write_jsonl(OUT_DIR / f"prompts_{name}.jsonl", ({"prompt": q} for q in prompts[name]))
    write_jsonl(OUT_DIR / "fresh.jsonl", fresh)
    write_json(OUT_DIR / "gold.json", {"scorer": p.gold_scorer, "label": p.gold_label})
    n_prompts = len(prompts["train"]) + len(prompts["heldout"])
    metrics = {"source": p.source, "gold_scorer": p.gold_scorer,
               "train_pairs": len(pairs["train"]), "heldout_pairs": len(pairs["heldout"]),
               "tie_rate": round(ties / n_prompts, 4) if p.source == "generate" else 0.0,
               "fresh_prompts": len(fresh)}
    if p.source == "generate":
        train = pairs["train"]
        metrics["gold_chosen_mean"] = round(sum(q["chosen_gold"] for q in train) / len(train), 4)
        metrics["gold_rejected_mean"] = round(
            sum(q["rejected_gold"] for q in train) / len(train), 4)
    write_metrics("preferences", metrics)
    print(f"{metrics['train_pairs']} train and {metrics['heldout_pairs']} held-out pairs "
          f"(tie rate {metrics['tie_rate']}) -> {OUT_DIR}")


if __name__ == "__main__":
    run_main(main)
