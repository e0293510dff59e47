"""Encoding throughput of the tokenize stage's encoder against plain `encode_batch`.

    python bench/tokenize_throughput.py

Encodes the embedded default's corpora (the standard library's docstrings and language
reference) with a byte-level BPE of 4096 trained on them, once each way, interleaved, and prints
MB/s of UTF-8 text. Both produce the same ids (checked).
"""

import os
import time

import numpy as np

from llmpipe.data.corpus import stdlib_docstrings, stdlib_reference, text_bytes
from llmpipe.data.tokenization import FastEncoder, train_bpe

ROUNDS = 3


def main() -> None:
    docs = stdlib_docstrings() + stdlib_reference()
    n_bytes = text_bytes(docs)
    tokenizer = train_bpe(docs, vocab_size=4096, min_frequency=2)
    encoder = FastEncoder(tokenizer, sample=docs[:200])
    backend = tokenizer.backend_tokenizer

    def plain() -> np.ndarray:
        encoded = backend.encode_batch(docs, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids + [encoder.eot], dtype=np.uint16) for e in encoded])

    def stage_encoder() -> np.ndarray:
        return encoder.encode_to_array(docs, np.dtype(np.uint16))

    best = {"plain encode_batch": 0.0, f"stage encoder ({encoder.backend})": 0.0}
    outputs = {}
    for _ in range(ROUNDS):  # interleaved, best of ROUNDS: absolute times drift on 2 cores
        for name, fn in zip(best, (plain, stage_encoder), strict=True):
            start = time.perf_counter()
            outputs[name] = fn()
            best[name] = max(best[name], n_bytes / (time.perf_counter() - start) / 1e6)
    a, b = outputs.values()
    assert np.array_equal(a, b), "the two encoders disagree"
    baseline = best["plain encode_batch"]
    print(
        f"corpus: {len(docs)} documents, {n_bytes / 1e6:.2f} MB, {len(a):,} tokens; "
        f"{os.cpu_count()} CPUs"
    )
    print("| encoder | MB/s | vs plain |\n|---|---:|---:|")
    for name, mbs in best.items():
        print(f"| {name} | {mbs:.1f} | {mbs / baseline:.2f}x |")


if __name__ == "__main__":
    main()
