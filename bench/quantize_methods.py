"""Every quantization method against fp32 on the finetuned model of the embedded default.

    python bench/quantize_methods.py [--torchao]   (after `dvc repro`: reads data/finetune/model)

One process, same inputs and threads for all: size on disk, validation perplexity, forward
latency, greedy generation tokens/s with `generate` (eager) and with the compiled static-cache
decoder (medians after warm-up), top-1 agreement with fp32. For reference it also times
`torch.ao.quantization.quantize_dynamic` (deprecated) and, with --torchao where torchao is
installed, torchao's int8 configs: neither is saved, so they have no size column.
"""

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from llmpipe import layout
from llmpipe.data.tokens import TokenBin
from llmpipe.evaluation.scores import (
    InferenceBench,
    compiled_generation_tokens_per_s,
    inference_figures,
    token_byte_lengths,
    top1_agreement,
)
from llmpipe.export.quantization import (
    METHODS,
    WEIGHTS_FILE,
    calibration_inputs,
    conv1d_to_linear,
    load_quantized,
    quantize,
    save_quantized,
)
from llmpipe.model.loading import load_causal_lm

MODEL_DIR = layout.FINETUNE_MODEL
TOKENS_DIR = layout.tokens("finetune")
BLOCK, WINDOWS, BATCH, NEW_TOKENS, REPEATS = 128, 64, 16, 32, 7


def reference_quantizers(fp32, with_torchao: bool) -> dict:
    """Other libraries' int8 on the same Conv1D -> Linear model (timed, not saved)."""
    converted = conv1d_to_linear(copy.deepcopy(fp32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        models = {
            "torch.ao quantize_dynamic": quantize_dynamic(
                copy.deepcopy(converted),
                {nn.Linear: per_channel_dynamic_qconfig},
                dtype=torch.qint8,
            )
        }
    if with_torchao:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        for name, config in (
            ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig()),
            ("torchao int8 weight-only", Int8WeightOnlyConfig()),
        ):
            models[name] = copy.deepcopy(converted)
            quantize_(models[name], config)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchao", action="store_true", help="also time torchao's int8 configs")
    args = parser.parse_args()
    fp32, tokenizer = load_causal_lm(MODEL_DIR, device="cpu")
    val = TokenBin.open(TOKENS_DIR, "val", expected_vocab_size=fp32.config.vocab_size)
    train = TokenBin.open(TOKENS_DIR, "train", expected_vocab_size=fp32.config.vocab_size)
    calibration = calibration_inputs(train, BLOCK, WINDOWS, BATCH)
    bench = InferenceBench(
        val,
        BLOCK,
        WINDOWS,
        BATCH,
        NEW_TOKENS,
        REPEATS,
        compiled=False,
        token_bytes=token_byte_lengths(tokenizer),
    )
    prompt = bench.prompt
    fp32_mb = (MODEL_DIR / "model.safetensors").stat().st_size / 1e6
    rows = {"fp32": (fp32, fp32_mb)}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            save_quantized(quantize(fp32, method, calibration), Path(tmp) / method, tokenizer)
            rows[method] = (
                load_quantized(Path(tmp) / method),
                (Path(tmp) / method / WEIGHTS_FILE).stat().st_size / 1e6,
            )
    rows.update(
        {name: (model, None) for name, model in reference_quantizers(fp32, args.torchao).items()}
    )
    figures = {}
    for name, (model, _) in rows.items():
        figures[name] = inference_figures(model, bench)
        try:
            figures[name]["compiled_generate_tokens_per_s"] = compiled_generation_tokens_per_s(
                model, prompt, NEW_TOKENS, REPEATS
            )
        except Exception as e:  # a reference quantizer that does not compile
            print(f"{name}: compiled decoding failed ({type(e).__name__}: {str(e)[:120]})")
    base = figures["fp32"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {MODEL_DIR}, "
        f"{BLOCK}-token windows x {WINDOWS}, forward on {BATCH}x{BLOCK}, greedy generation "
        f"of {NEW_TOKENS} tokens after a {prompt.size(1)}-token prompt"
    )
    print(
        "| method | MB | x fp32 size | val perplexity | change | top-1 agreement | "
        "forward ms | forward speedup | generate tok/s | compiled decoder tok/s | "
        "generate vs fp32 eager | compiled vs fp32 eager |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    eager_base = base["generate_tokens_per_s"]
    for name, (model, mb) in rows.items():
        f = figures[name]
        compiled = f.get("compiled_generate_tokens_per_s")
        agreement = top1_agreement(model, fp32, val, BLOCK, WINDOWS, BATCH)
        size = f"{mb:.2f} | {mb / fp32_mb:.2f}" if mb is not None else "- | -"
        print(
            f"| {name} | {size} | {f['val_perplexity']:.2f} | "
            f"{100 * (f['val_perplexity'] / base['val_perplexity'] - 1):+.2f}% | "
            f"{agreement:.3f} | {f['forward_ms']:.1f} | "
            f"{base['forward_ms'] / f['forward_ms']:.2f}x | "
            f"{f['generate_tokens_per_s']:.0f} | "
            + (f"{compiled:.0f}" if compiled else "failed")
            + " | "
            f"{f['generate_tokens_per_s'] / eager_base:.2f}x | "
            + (f"{compiled / eager_base:.2f}x" if compiled else "-")
            + " |"
        )


if __name__ == "__main__":
    main()
