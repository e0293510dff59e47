"""Gold scorers: the ground truth that preference labels come from and that RLHF is judged by.

A gold scorer maps texts to floats, higher is better. `vader` is VADER's compound sentiment
score in [-1, 1] ("write more positive text", the classic RLHF toy task), with each word of a
text counted once; `hf:<name>` or a
directory is a transformers text-classification model, scored by the probability of
`label` (e.g. POSITIVE for an SST-2 model).

Either can be gamed by saying a liked word over and over ("the value of the value of ...":
VADER counts "value" as positive once per use). So VADER reads each word of its lexicon once
(its first use), and `repetition_penalty`, for any scorer, subtracts that weight
times the share of the text's word trigrams that repeat an earlier one (0 for varied text,
near 1 for a loop). At weight 1 a text that only loops scores no better than neutral text
(VADER's compound and a classifier's probability are at most 1).

A lexicon also scores words that carry no sentiment in the corpus's domain: in the Python
reference "value" (VADER +1.4), "true", "support" and "argument" (-1.5) are vocabulary, and a
policy rewarded for "value" learns to say it (it rose from 7% to 74% of REINFORCE's
completions). `domain_words` finds them from the corpus itself, as the lexicon words used in
more than a share of its paragraphs, and VADER reads them as neutral (`neutral_words`).
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable, Collection, Container, Iterable, Sequence

from llmpipe.errors import DataError, ParamsError
from llmpipe.rl.degeneration import repeated_ngram_share

GoldScorer = Callable[[Sequence[str]], list[float]]


def load_gold_scorer(
    spec: str,
    label: str | None = None,
    repetition_penalty: float = 0.0,
    neutral_words: Collection[str] = (),
    batch_size: int = 32,
) -> GoldScorer:
    score = _scorer(spec, label, neutral_words, batch_size)
    if repetition_penalty == 0:
        return score
    return lambda texts: [
        s - repetition_penalty * repeated_ngram_share([t], 3)
        for s, t in zip(score(texts), texts, strict=True)
    ]


def _scorer(
    spec: str, label: str | None, neutral_words: Collection[str], batch_size: int
) -> GoldScorer:
    if spec == "vader":
        analyzer = _vader()
        for word in neutral_words:  # this analyzer's own copy of the lexicon
            analyzer.lexicon.pop(word, None)
        return lambda texts: [
            analyzer.polarity_scores(each_word_once(t, analyzer.lexicon))["compound"] for t in texts
        ]
    return _classifier_scorer(spec, label, batch_size)


def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def scorer_lexicon(spec: str) -> Container[str] | None:
    """The scorer's word list, or None for a classifier (it has none to neutralise)."""
    return _vader().lexicon if spec == "vader" else None


def domain_words(paragraphs: Iterable[str], lexicon: Container[str], share: float) -> list[str]:
    """The lexicon's words used in more than `share` of the paragraphs (case and punctuation
    aside): the domain's vocabulary rather than its sentiment, sorted."""
    used: Counter[str] = Counter()
    total = 0
    for paragraph in paragraphs:
        total += 1
        used.update({w.strip(string.punctuation).lower() for w in paragraph.split()})
    return sorted(w for w, n in used.items() if w in lexicon and n > share * total)


def each_word_once(text: str, lexicon: Container[str]) -> str:
    """The text without the second and later uses of each word of `lexicon` (case and
    punctuation aside): a lexicon scorer then counts a liked word once, however often it is
    said. Other words (negations, boosters, "but") stay where they are, as VADER reads them."""
    seen: set[str] = set()
    kept = []
    for word in text.split():
        key = word.strip(string.punctuation).lower()
        if key not in lexicon or key not in seen:
            kept.append(word)
        seen.add(key)
    return " ".join(kept)


def _classifier_scorer(spec: str, label: str | None, batch_size: int) -> GoldScorer:
    from transformers import pipeline

    if label is None:
        raise ParamsError(
            f"preferences.gold_label: missing: {spec} is a classifier, name the "
            "label to reward (e.g. POSITIVE)"
        )
    name = spec.removeprefix("hf:")
    try:
        classify = pipeline("text-classification", model=name, top_k=None)
    except (OSError, ValueError) as e:
        raise DataError(f"gold scorer {spec!r}: cannot load ({e})") from e
    labels = set(classify.model.config.id2label.values())
    if label not in labels:
        raise ParamsError(
            f"preferences.gold_label: {label!r} is not a label of {spec} "
            f"(its labels: {', '.join(sorted(labels))})"
        )

    def score(texts: Sequence[str]) -> list[float]:
        results = classify(list(texts), batch_size=batch_size, truncation=True)
        return [next(r["score"] for r in result if r["label"] == label) for result in results]

    return score
