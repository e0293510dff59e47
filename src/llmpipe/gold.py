"""Gold scorers: the ground truth that preference labels come from and that RLHF is judged by.

A gold scorer maps texts to floats, higher is better. `vader` is VADER's compound sentiment
score in [-1, 1] ("write more positive text", the classic RLHF toy task); `hf:<name>` or a
directory is a transformers text-classification model, scored by the probability of
`label` (e.g. POSITIVE for an SST-2 model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llmpipe.errors import DataError, ParamsError

GoldScorer = Callable[[Sequence[str]], list[float]]


def load_gold_scorer(spec: str, label: str | None = None, batch_size: int = 32) -> GoldScorer:
    if spec == "vader":
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer = SentimentIntensityAnalyzer()
        return lambda texts: [analyzer.polarity_scores(t)["compound"] for t in texts]
    return _classifier_scorer(spec, label, batch_size)


def _classifier_scorer(spec: str, label: str | None, batch_size: int) -> GoldScorer:
    from transformers import pipeline

    if label is None:
        raise ParamsError(f"preferences.gold_label: missing: {spec} is a classifier, name the "
                          "label to reward (e.g. POSITIVE)")
    name = spec.removeprefix("hf:")
    try:
        classify = pipeline("text-classification", model=name, top_k=None)
    except (OSError, ValueError) as e:
        raise DataError(f"gold scorer {spec!r}: cannot load ({e})") from e
    labels = set(classify.model.config.id2label.values())
    if label not in labels:
        raise ParamsError(f"preferences.gold_label: {label!r} is not a label of {spec} "
                          f"(its labels: {', '.join(sorted(labels))})")

    def score(texts: Sequence[str]) -> list[float]:
        results = classify(list(texts), batch_size=batch_size, truncation=True)
        return [next(r["score"] for r in result if r["label"] == label) for result in results]

    return score
