"""quantize: int8 post-training quantization of the finetuned (or merged LoRA) model, measured
against fp32 in one process on the same inputs and threads."""

import time

import torch

from llmpipe import layout
from llmpipe.data.tokens import TokenBin
from llmpipe.evaluation.scores import InferenceBench, token_byte_lengths
from llmpipe.export.params import QuantizeParams
from llmpipe.export.quantization import (
    WEIGHTS_FILE,
    calibration_inputs,
    compare_to_fp32,
    load_for_inference,
    measurement_device,
    quantize,
    save_quantized,
)
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.model.loading import load_causal_lm, token_vocab_size
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main

SOURCES = {"finetune": layout.FINETUNE_MODEL, "lora": layout.LORA_MERGED}


def main() -> None:
    started = time.perf_counter()
    shared, p = load_stage_params(QuantizeParams)
    torch.manual_seed(shared.seed)
    source_dir = SOURCES[p.source]
    # fp32 is measured beside int8, on the same device: the GPU for weight-only int8 (torchao's
    # kernels), the CPU for the int8-activation methods; the metrics name it.
    device = measurement_device(p.device, p.method)
    fp32, tokenizer = load_causal_lm(source_dir, device=device)
    fp32.eval()
    tokens_dir = layout.tokens("finetune")
    vocab = token_vocab_size(fp32, tokenizer)
    val = TokenBin.open(tokens_dir, "val", expected_vocab_size=vocab)
    calibration = None
    if p.method == "static_int8":
        train = TokenBin.open(tokens_dir, "train", expected_vocab_size=vocab)
        calibration = calibration_inputs(train, p.block_size, p.calibration_windows, p.batch_size)
    with atomic_dir(layout.QUANTIZED_MODEL) as tmp:
        save_quantized(
            quantize(fp32, p.method, calibration), tmp, tokenizer, source=str(source_dir)
        )
    int8 = load_for_inference(layout.QUANTIZED_MODEL, p.device)  # as evaluate loads it

    bench = InferenceBench(
        val,
        p.block_size,
        p.eval_windows,
        p.batch_size,
        p.generate_tokens,
        p.repeats,
        p.compile,
        token_byte_lengths(tokenizer),
    )
    metrics = {
        "source": p.source,
        "method": p.method,
        **compare_to_fp32(
            fp32,
            int8,
            bench,
            source_dir / "model.safetensors",
            layout.QUANTIZED_MODEL / WEIGHTS_FILE,
            layout.items_file("quantize"),
        ),
    }
    metrics["perf"]["wall_s"] = time.perf_counter() - started
    write_metrics("quantize", metrics)
    speedups = ", ".join(
        f"{k} x{v:.2f}" for k, v in metrics["perf"]["generate_speedup_vs_fp32_eager"].items()
    )
    print(
        f"{p.method} (measured on {device}): {metrics['fp32_size_mb']:.2f} MB -> "
        f"{metrics['int8_size_mb']:.2f} MB, "
        f"perplexity {metrics['fp32_val_perplexity']:.2f} -> "
        f"{metrics['int8_val_perplexity']:.2f} ({metrics['fp32_val_bits_per_byte']:.4f} -> "
        f"{metrics['int8_val_bits_per_byte']:.4f} bits per byte), generation vs fp32 eager: "
        f"{speedups} -> {layout.QUANTIZED_MODEL}"
    )


if __name__ == "__main__":
    run_main(main)
