"""quantize: int8 post-training quantization of the finetuned (or merged LoRA) model, measured
against fp32 in one process on the same inputs and threads."""

import time
from pathlib import Path

import torch

from llmpipe.causal_lm import load_base
from llmpipe.data import TokenBin
from llmpipe.evaluation import inference_figures, top1_agreement
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.quantization import (
    WEIGHTS_FILE,
    calibration_inputs,
    load_quantized,
    quantize,
    save_quantized,
)
from llmpipe.stage import run_main

SOURCES = {"finetune": Path("data/finetune/model"), "lora": Path("data/lora/merged")}
TOKENS_DIR = Path("data/tokens/finetune")
OUT_DIR = Path("data/quantize/model")


def main() -> None:
    started = time.perf_counter()
    shared, p = load_stage_params("quantize")
    torch.manual_seed(shared.seed)
    source_dir = SOURCES[p.source]
    fp32, tokenizer = load_base(str(source_dir), device="cpu")  # int8 kernels are CPU ones
    fp32.eval()
    val = TokenBin.open(TOKENS_DIR, "val", expected_vocab_size=fp32.config.vocab_size)
    calibration = None
    if p.method == "static_int8":
        train = TokenBin.open(TOKENS_DIR, "train", expected_vocab_size=fp32.config.vocab_size)
        calibration = calibration_inputs(train, p.block_size, p.calibration_windows,
                                         p.batch_size)
    int8 = quantize(fp32, p.method, calibration)
    with atomic_dir(OUT_DIR) as tmp:
        save_quantized(int8, tmp, tokenizer, source=str(source_dir))
    int8 = load_quantized(OUT_DIR)  # measure what was saved, as downstream stages will load it

    batch = next(val.eval_batches(p.block_size, p.batch_size, p.batch_size))[0]
    prompt = batch[:1, :16]
    figures = {name: inference_figures(model, val, p.block_size, p.eval_windows, p.batch_size,
                                       batch, prompt, p.generate_tokens, p.repeats, p.compile)
               for name, model in (("fp32", fp32), ("int8", int8))}
    fp32_mb = (source_dir / "model.safetensors").stat().st_size / 1e6
    int8_mb = (OUT_DIR / WEIGHTS_FILE).stat().st_size / 1e6
    ppl32, ppl8 = figures["fp32"]["val_perplexity"], figures["int8"]["val_perplexity"]
    # Generation speed: `generate` (eager) and, with quantize.compile, the compiled static-cache
    # decoder; every speedup is against fp32 eager `generate`, the baseline users start from.
    tokens_per_s = {f"{name}_eager": f["generate_tokens_per_s"] for name, f in figures.items()}
    if p.compile:
        tokens_per_s.update({f"{name}_compiled": f["compiled_generate_tokens_per_s"]
                             for name, f in figures.items()})
    baseline = tokens_per_s["fp32_eager"]
    metrics = {
        "source": p.source,
        "method": p.method,
        "fp32_size_mb": round(fp32_mb, 4),
        "int8_size_mb": round(int8_mb, 4),
        "size_ratio": round(int8_mb / fp32_mb, 4),
        "fp32_val_perplexity": round(ppl32, 4),
        "int8_val_perplexity": round(ppl8, 4),
        "perplexity_change_percent": round(100 * (ppl8 / ppl32 - 1), 4),
        "top1_agreement": round(top1_agreement(int8, fp32, val, p.block_size, p.eval_windows,
                                               p.batch_size), 4),
        "perf": {
            "threads": torch.get_num_threads(),
            "fp32_forward_ms": round(figures["fp32"]["forward_ms"], 3),
            "int8_forward_ms": round(figures["int8"]["forward_ms"], 3),
            "forward_speedup": round(figures["fp32"]["forward_ms"]
                                     / figures["int8"]["forward_ms"], 3),
            "generate_tokens_per_s": {k: round(v, 1) for k, v in tokens_per_s.items()},
            "generate_speedup_vs_fp32_eager": {k: round(v / baseline, 3)
                                               for k, v in tokens_per_s.items()
                                               if k != "fp32_eager"},
            "wall_s": round(time.perf_counter() - started, 1),
        },
    }
    write_metrics("quantize", metrics)
    speedups = ", ".join(f"{k} x{v}" for k, v in
                         metrics["perf"]["generate_speedup_vs_fp32_eager"].items())
    print(f"{p.method}: {fp32_mb:.2f} MB -> {int8_mb:.2f} MB, perplexity {ppl32:.2f} -> "
          f"{ppl8:.2f}, generation vs fp32 eager: {speedups} -> {OUT_DIR}")


if __name__ == "__main__":
    run_main(main)
