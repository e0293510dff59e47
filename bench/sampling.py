"""How long drawing one token takes on this machine: torch.multinomial (what transformers'
`generate` samples with) against the inverse of the cumulative distribution
(llmpipe.rl.sampling.InverseCdfSample), side by side, for rows x vocabulary sizes of the
pipeline (4,096: the embedded default; 50,257: GPT-2's).

    python bench/sampling.py
"""

from __future__ import annotations

import time

import torch

from llmpipe.rl.sampling import InverseCdfSample

REPEATS = 30


def per_call_ms(fn) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    return (time.perf_counter() - started) / REPEATS * 1e3


def main() -> None:
    torch.manual_seed(0)
    sample = InverseCdfSample()
    print("| rows x vocabulary | torch.multinomial ms | inverse CDF ms | ratio |")
    print("|---|---:|---:|---:|")
    for rows, vocab in ((64, 4096), (256, 4096), (64, 50257)):
        scores = torch.randn(rows, vocab)
        probs = scores.softmax(-1)
        slow = per_call_ms(lambda: torch.multinomial(probs, 1))  # noqa: B023
        fast = per_call_ms(lambda: sample(None, scores))  # noqa: B023
        print(f"| {rows} x {vocab} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f} |")
    print(f"\n(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
