"""Held-out judges: two sentiment scorers that no RL stage optimises, scored on every RL stage's
held-out samples beside the gold score.

The gold scorer labels the preference pairs and the reward model learns it, so a word both of
them like (VADER's "value") can carry a gold gain on its own. Judges with other lexicons tell a
policy that writes more positive text from one that learned a word: AFINN (Nielsen 2011, a
word list scored -5..5; here its sum over the text per word, so length does not count) and
TextBlob's polarity (the pattern lexicon, -1..1, with negation and intensifiers). Neither
scores "value" or "values". Both ship their lexicons in their PyPI packages: nothing is
downloaded."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Judge = Callable[[Sequence[str]], list[float]]

# What each judge is called in reports and metrics (<name>, before_<name>, <gain>).
HELDOUT_JUDGES = {"afinn_score": "afinn_gain", "textblob_score": "textblob_gain"}


def load_heldout_judges() -> dict[str, Judge]:
    from afinn import Afinn
    from textblob import TextBlob

    afinn = Afinn()

    def afinn_per_word(texts: Sequence[str]) -> list[float]:
        return [afinn.score(t) / max(len(t.split()), 1) for t in texts]

    def textblob_polarity(texts: Sequence[str]) -> list[float]:
        return [TextBlob(t).sentiment.polarity for t in texts]

    return {"afinn_score": afinn_per_word, "textblob_score": textblob_polarity}
