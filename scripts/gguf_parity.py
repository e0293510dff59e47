"""llama.cpp itself on the gguf stage's files (make gguf-parity): llama.cpp built from the
llama-cpp-python sdist (it vendors llama.cpp; minutes to compile, so not in CI) loads each file,
tokenizes as the HF tokenizer does, and continues greedily as the HF model does, with the same
next-token log-probabilities.

    make gguf-parity                      # = python scripts/gguf_parity.py after the build
    python scripts/gguf_parity.py --types f16 q8_0 --tokens 24

For each file: the texts below tokenized by llama.cpp (its `gpt-2` pre-tokenizer and the
file's merges) against the HF tokenizer; the HF model's greedy continuation of the check prompt
(`gguf.check_prompt`) against llama.cpp's; and the largest |log-probability difference| over
the vocabulary at every position of prompt and continuation (both read the same tokens: the HF
model's). Exit status 1 if a tokenization or a greedy token differs where the HF model's two
likeliest tokens are not a near tie (NEAR_TIE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src")]

from llmpipe import layout  # noqa: E402
from llmpipe.export.gguf import HfReference  # noqa: E402
from llmpipe.export.params import GgufParams  # noqa: E402
from llmpipe.model.loading import load_causal_lm  # noqa: E402
from llmpipe.params import load_stage_params  # noqa: E402

# Texts whose pre-tokenization differs between tokenizers (spaces, digits, contractions,
# punctuation runs, newlines, non-ASCII), as llama.cpp's own tokenizer tests probe them.
TEXTS = [
    "Return the sum of a and b.",
    "  two  spaces, then\n\nnewlines\tand a tab",
    "It's 2026; they'll pay 1234567.89 dollars (or 12,345).",
    "def f(x):\n    return x ** 2  # squared",
    "Ünïcödé — “quotes” and emoji 🙂 too",
    "<|endoftext|> then text: the special token's id, as the HF tokenizer reads it",
]
NEAR_TIE = 0.01  # HF's top-two logit margin below which another arithmetic may pick the other


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def check_file(path: Path, model_dir: Path, prompt: str, new_tokens: int) -> tuple[dict, bool]:
    from llama_cpp import Llama

    model, tokenizer = load_causal_lm(model_dir)
    model.eval()
    context = model.config.n_positions
    llm = Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False, seed=0)
    ok = True
    tokenized_alike = 0
    for text in TEXTS:
        # special=True: the text's <|endoftext|> is the special token, as HF's tokenizer reads it
        ours = llm.tokenize(text.encode(), add_bos=False, special=True)
        theirs = tokenizer(text).input_ids
        if ours == theirs:
            tokenized_alike += 1
        else:
            ok = False
            print(f"  tokenization differs on {text!r}: llama.cpp {ours} HF {theirs}")

    reference = HfReference.of(model, tokenizer, prompt, new_tokens)
    llm.reset()
    llm.eval(reference.ids)
    llama_logits = np.array(llm.scores[: len(reference.ids)], dtype=np.float32)
    agreement = reference.agreement(llama_logits)
    where_not = agreement["hf_top2_margin_where_not"]
    if where_not is not None and where_not > NEAR_TIE:
        ok = False
    picks = len(reference.ids) - reference.prompt_length
    logprob_diff = np.abs(log_softmax(llama_logits) - log_softmax(reference.logits)).max()
    row = {
        "tokenized alike": f"{tokenized_alike}/{len(TEXTS)}",
        "greedy alike": f"{round(agreement['greedy_agreement'] * picks)}/{picks}",
        "HF top-2 margin where not": f"{where_not:.4f}" if where_not is not None else "-",
        "max |logprob diff|": f"{logprob_diff:.4f}",
    }
    return row, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=None, help="default: gguf.check_tokens")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("error: llama_cpp is not installed: make gguf-parity builds it")
    _, p = load_stage_params(GgufParams)
    new_tokens = args.tokens or p.check_tokens
    print(f"llama.cpp through llama-cpp-python {llama_cpp.__version__}; prompt {p.check_prompt!r}")
    lines = [
        "| file | tokenized alike | greedy alike | HF top-2 margin where not "
        "| max \\|logprob diff\\| |",
        "|---|---|---|---|---|",
    ]
    all_ok = True
    for name in p.models:
        for file_type in args.types:
            path = layout.GGUF / f"{name}-{file_type}.gguf"
            if not path.exists():
                sys.exit(f"error: {path}: not found (dvc repro gguf)")
            row, ok = check_file(path, layout.MODEL_OUTPUTS[name], p.check_prompt, new_tokens)
            all_ok &= ok
            lines.append(f"| {path.name} | " + " | ".join(row.values()) + " |")
            print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    print("llama.cpp agrees with the HF models" if all_ok else "llama.cpp DIFFERS (above)")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
