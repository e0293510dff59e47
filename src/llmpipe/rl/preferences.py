"""The preference directory: what the preferences stage writes and the reward model, GRPO and
evaluate read. This module is the one owner of its format (`PreferenceSet.write` and the
readers):

    train.jsonl, heldout.jsonl                 pairs: prompt, chosen, rejected (+ gold scores)
    prompts_train.jsonl, prompts_heldout.jsonl {"prompt": ...} per line
    fresh.jsonl                                held-out prompts with two new completions each
                                               and their gold scores (the reward model's
                                               agreement with the gold scorer)
    gold.json                                  the gold scorer that labelled them: scorer, label,
                                               repetition penalty, the words it reads as neutral
    prompt_format.json                         plain text or chat template (llmpipe.data.chat)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from llmpipe.data.chat import PLAIN, PromptFormat
from llmpipe.errors import DataError
from llmpipe.io import atomic_dir, read_jsonl, write_json, write_jsonl
from llmpipe.rl.gold import GoldScorer, load_gold_scorer

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
SPLITS = ("train", "heldout")  # heldout prompts come from the finetune corpus's val split
GOLD_FILE = "gold.json"
FRESH_FILE = "fresh.jsonl"


def _pairs_file(directory: Path, split: str) -> Path:
    return directory / f"{split}.jsonl"


def _prompts_file(directory: Path, split: str) -> Path:
    return directory / f"prompts_{split}.jsonl"


@dataclass(frozen=True)
class GoldSpec:
    scorer: str  # vader, hf:<name> or a directory
    label: str | None  # the label rewarded, for a classifier
    repetition_penalty: float = 0.0  # weight of the repeated-trigram share (llmpipe.rl.gold)
    neutral_words: tuple[str, ...] = ()  # the domain's vocabulary, scored 0 (llmpipe.rl.gold)

    def load(self) -> GoldScorer:
        return load_gold_scorer(
            self.scorer, self.label, self.repetition_penalty, self.neutral_words
        )


@dataclass(frozen=True)
class PreferenceSet:
    """What the preferences stage writes and the reward model, GRPO and evaluate read."""

    pairs: dict[str, list[dict]]  # split -> pairs
    prompts: dict[str, list[str]]  # split -> distinct prompts
    fresh: list[dict]
    gold: GoldSpec
    prompt_format: PromptFormat = PLAIN

    def write(self, directory: Path) -> None:
        """The whole directory at once: a crash leaves the previous one intact."""
        with atomic_dir(directory) as tmp:
            for split in SPLITS:
                write_jsonl(_pairs_file(tmp, split), self.pairs[split])
                write_jsonl(_prompts_file(tmp, split), ({"prompt": q} for q in self.prompts[split]))
            write_jsonl(tmp / FRESH_FILE, self.fresh)
            write_json(tmp / GOLD_FILE, asdict(self.gold))
            self.prompt_format.write(tmp)


def read_pairs(directory: Path, split: str) -> list[dict]:
    return read_jsonl(_pairs_file(directory, split))


def read_prompts(directory: Path, split: str) -> list[str]:
    return [r["prompt"] for r in read_jsonl(_prompts_file(directory, split))]


def read_fresh(directory: Path) -> list[dict]:
    return read_jsonl(directory / FRESH_FILE)


def read_gold_spec(directory: Path) -> GoldSpec:
    path = directory / GOLD_FILE
    if not path.exists():
        raise DataError(f"{path}: not found (run the preferences stage first)")
    spec = json.loads(path.read_text())
    return GoldSpec(**{**spec, "neutral_words": tuple(spec.get("neutral_words", ()))})
