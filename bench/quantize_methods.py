"""Every quantization method against fp32 on the finetuned model of the embedded default.

    python bench/quantize_methods.py      (after `dvc repro`: it reads data/finetune/model)

One process, same inputs and threads for all: size on disk, validation perplexity, forward
latency and greedy generation tokens/s (medians after warm-up), top-1 agreement with fp32.
"""

import tempfile
from pathlib import Path

import torch

from llmpipe.causal_lm import load_base
from llmpipe.data import TokenBin
from llmpipe.evaluation import inference_figures, top1_agreement
from llmpipe.quantization import METHODS, WEIGHTS_FILE, load_quantized, quantize, save_quantized

MODEL_DIR = Path("data/finetune/model")
TOKENS_DIR = Path("data/tokens/finetune")
BLOCK, WINDOWS, BATCH, NEW_TOKENS, REPEATS = 128, 64, 16, 32, 7


def main() -> None:
    fp32, tokenizer = load_base(str(MODEL_DIR), device="cpu")
    val = TokenBin.open(TOKENS_DIR, "val", expected_vocab_size=fp32.config.vocab_size)
    batch = next(val.eval_batches(BLOCK, BATCH, BATCH))[0]
    prompt = batch[:1, :16]
    rows = {"fp32": (fp32, (MODEL_DIR / "model.safetensors").stat().st_size / 1e6)}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            save_quantized(quantize(fp32, method), Path(tmp) / method, tokenizer)
            rows[method] = (load_quantized(Path(tmp) / method),
                            (Path(tmp) / method / WEIGHTS_FILE).stat().st_size / 1e6)
        figures = {name: inference_figures(model, val, BLOCK, WINDOWS, BATCH, batch, prompt,
                                           NEW_TOKENS, REPEATS)
                   for name, (model, _) in rows.items()}
    base = figures["fp32"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {MODEL_DIR}, "
          f"{BLOCK}-token windows x {WINDOWS}, forward on {BATCH}x{BLOCK}, greedy generation "
          f"of {NEW_TOKENS} tokens")
    print("| method | MB | x fp32 size | val perplexity | change | top-1 agreement | "
          "forward ms | forward speedup | generate tok/s | generate speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (model, mb) in rows.items():
        f = figures[name]
        agreement = top1_agreement(model, fp32, val, BLOCK, WINDOWS, BATCH)
        print(f"| {name} | {mb:.2f} | {mb / rows['fp32'][1]:.2f} | {f['val_perplexity']:.2f} | "
              f"{100 * (f['val_perplexity'] / base['val_perplexity'] - 1):+.2f}% | "
              f"{agreement:.3f} | {f['forward_ms']:.1f} | "
              f"{base['forward_ms'] / f['forward_ms']:.2f}x | "
              f"{f['generate_tokens_per_s']:.0f} | "
              f"{f['generate_tokens_per_s'] / base['generate_tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
