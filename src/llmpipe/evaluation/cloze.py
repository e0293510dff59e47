"""The harness task that ships offline, `llmpipe_cloze` (llmpipe.evaluation.harness):
multiple-choice cloze items from the embedded default's held-out finetune documents, written
once into src/llmpipe/evaluation/harness_tasks/ and kept in git.

    python -m llmpipe.evaluation.cloze [--count 200]    # after `dvc repro download`
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

from llmpipe.evaluation.harness import TASKS_DIR

CLOZE_FILE = TASKS_DIR / "llmpipe_cloze.jsonl"


def cloze_items(
    documents: Sequence[str], count: int, seed: int, ending_words: int = 4, context_words: int = 24
) -> list[dict]:
    """Multiple-choice cloze items from held-out documents: a sentence's last `ending_words`
    words against the endings of three other sentences, the context the words before it."""
    rng = random.Random(seed)
    sentences = []  # (document index, words before the ending, ending)
    for index, doc in enumerate(documents):
        words = doc.split()
        start = 0
        for end, word in enumerate(words, 1):
            if word.endswith(".") and end - start >= ending_words + 6:
                before = words[max(0, end - ending_words - context_words) : end - ending_words]
                sentences.append(
                    (index, " ".join(before), " ".join(words[end - ending_words : end]))
                )
                start = end
            elif word.endswith("."):
                start = end
    rng.shuffle(sentences)
    items = []
    for doc, context, ending in sentences:
        drawn = rng.sample(sentences, min(12, len(sentences)))
        others = [e for d, _, e in drawn if d != doc and e != ending]
        if len(set(others)) < 3:
            continue
        choices = [ending, *list(dict.fromkeys(others))[:3]]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(ending)})
        if len(items) == count:
            break
    return items


def build_cloze(count: int = 200) -> Path:
    """The shipped task's items from the embedded default's held-out finetune documents."""
    from llmpipe import layout
    from llmpipe.data.corpus import read_texts
    from llmpipe.data.tokenization import split_by_document
    from llmpipe.io import write_jsonl
    from llmpipe.params import PARAMS_FILE, read_params_file

    raw = read_params_file(PARAMS_FILE)
    docs = list(read_texts(layout.raw_corpus("finetune")))
    held_out = split_by_document(docs, raw["tokenize"]["val_fraction"], raw["seed"], "finetune")[
        "val"
    ]
    write_jsonl(CLOZE_FILE, cloze_items(held_out, count, raw["seed"]))
    return CLOZE_FILE


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    print(f"wrote {build_cloze(args.count)}")
