"""Does a policy still write text, or has it found a loop that its judges like? Diversity of
its completions (distinct n-grams, repeated n-grams), measured on words, so that it does not
depend on the tokenizer. Fluency, the other half, is the completion's loss under the reference
policy (rlhf.policy_report)."""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Sequence


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (Li et al. 2016); 1.0 is all different.
    No n-gram at all counts as fully distinct."""
    grams = [g for text in texts for g in _ngrams(_words(text), n)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_ngram_share(texts: Sequence[str], n: int = 3) -> float:
    """The share of n-grams that repeat one seen earlier in the same text: 0 for varied text,
    near 1 for a phrase said over and over."""
    repeats = total = 0
    for text in texts:
        seen: set[tuple[str, ...]] = set()
        for gram in _ngrams(_words(text), n):
            repeats += gram in seen
            seen.add(gram)
            total += 1
    return repeats / total if total else 0.0


def word_shares(texts: Sequence[str], top: int = 100) -> dict[str, float]:
    """The `top` words that most texts use (lowercased, punctuation stripped), each with the
    share of texts that use it at least once: where a policy learned one word, its share
    jumps."""
    counts = Counter(
        word
        for text in texts
        for word in {w.strip(string.punctuation) for w in _words(text)}
        if word
    )
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {word: count / max(len(texts), 1) for word, count in ranked}


def rising_words(before: dict[str, float], after: dict[str, float], top: int = 5) -> list[tuple]:
    """The words whose share of texts rose most: (word, share before, share after)."""
    words = set(before) | set(after)
    rises = sorted(
        ((w, before.get(w, 0.0), after.get(w, 0.0)) for w in words),
        key=lambda r: (r[1] - r[2], r[0]),
    )
    return [r for r in rises[:top] if r[2] > r[1]]
