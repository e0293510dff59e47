"""The harness task that ships offline, `llmpipe_cloze` (llmpipe.evaluation.harness):
multiple-choice cloze items from the finetune corpus's validation documents.

The evaluate stage builds the items from the validation split of the run it evaluates (its
token file, decoded), so they come from documents no stage trained on, whatever the seed or
val_fraction that drew the split; the harness reads them through the task's metadata
(`items_file`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmpipe.data.tokens import TokenBin
from llmpipe.errors import DataError

CLOZE_ITEMS = 200  # the items the task asks for (fewer where the documents run out)
CLOZE_FILE = "cloze.jsonl"  # in layout.EVALUATE_SAMPLES, beside the samples


def build_cloze(val_bin: TokenBin, tokenizer, seed: int, count: int = CLOZE_ITEMS) -> list[dict]:
    """The task's items from a validation split's documents, decoded."""
    texts = [tokenizer.decode(ids.tolist()) for ids in val_bin.documents()]
    items = cloze_items(texts, count, seed)
    if not items:  # few items still score, with a wide standard error; none cannot
        raise DataError(
            f"{val_bin.path}: no cloze item from {len(texts)} validation document(s) (an item "
            "takes its wrong endings from other documents): raise tokenize.val_fraction, or "
            "leave llmpipe_cloze out of evaluate.harness_tasks"
        )
    return items


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
