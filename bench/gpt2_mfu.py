"""GPT-2 124M training throughput and MFU on one GPU, and what it means for a real run.

    python bench/gpt2_mfu.py                  # GPU: 12 x 768, T=1024, bf16, compiled
    python bench/gpt2_mfu.py --micro          # CPU, micro shapes: the dry run of the same code
    python bench/gpt2_mfu.py --json out.json  # also write the figures as JSON

llmpipe's own GPT (the pretrain stage's model) with fused AdamW under bf16 autocast over fp32
weights, on synthetic tokens (throughput does not depend on what the tokens say), timed over
--steps steps after --warmup steps (compilation and allocator warm-up). MFU is the achieved
training FLOP/s (6N + 12LHQT per token, nanoGPT's formula) over the GPU's data-sheet bf16 peak
(llmpipe.train.pretrain.PEAK_BF16_FLOPS); a GPU not in that table, or a CPU, gets no MFU.

Time to target: the published GPT-2 124M reference needs about 10 B FineWeb tokens to reach a
validation loss of 3.28 (llm.c's baseline, the modded-nanogpt target). The estimate divides
those tokens by 8 x this GPU's rate: perfect scaling over 8 GPUs, no data loading or
evaluation cost, so it is a lower bound on the wall time of that run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llmpipe.model.gpt import GPT, GPTConfig
from llmpipe.train.pretrain import peak_flops_of_gpu

TARGET_TOKENS = 10e9  # GPT-2 124M to val loss 3.28 on FineWeb (llm.c; modded-nanogpt's target)
TARGET_GPUS = 8

GPU_SHAPE = {
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "block_size": 1024,
    "batch": 32,
    "vocab": 50257,
    "vocab_multiple": 64,
}
MICRO_SHAPE = {
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 64,
    "block_size": 64,
    "batch": 4,
    "vocab": 512,
    "vocab_multiple": 1,
}


def measure(
    shape: dict,
    device: torch.device,
    steps: int,
    warmup: int,
    compile_model: bool,
    chunked_loss: bool,
) -> dict:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=shape["vocab"],
        block_size=shape["block_size"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        vocab_multiple=shape["vocab_multiple"],
        chunked_loss=chunked_loss,
    )
    raw = GPT(config).to(device)
    optimizer = raw.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    model = torch.compile(raw) if compile_model else raw
    tokens = torch.randint(
        shape["vocab"],
        (shape["batch"], shape["block_size"] + 1),
        generator=torch.Generator().manual_seed(0),
    ).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize()
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize()
    seconds = time.perf_counter() - started
    tokens_per_s = steps * shape["batch"] * shape["block_size"] / seconds
    peak = peak_flops_of_gpu(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": shape,
        "parameters": raw.num_params(),
        "dtype": "bfloat16 autocast",
        "compiled": compile_model,
        "chunked_loss": chunked_loss,
        "steps": steps,
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 1),
        "final_loss": loss.item(),
        "tokens_per_s": round(tokens_per_s),
        "flops_per_token": raw.flops_per_token(),
        "peak_flops": peak,
        "mfu": None if peak is None else round(raw.estimate_mfu(tokens_per_s, peak), 4),
        "max_memory_gb": (
            round(torch.cuda.max_memory_allocated(device) / 1e9, 1)
            if device.type == "cuda"
            else None
        ),
        "time_to_target": {
            "tokens": TARGET_TOKENS,
            "gpus": TARGET_GPUS,
            "hours": round(TARGET_TOKENS / (TARGET_GPUS * tokens_per_s) / 3600, 2),
            "assumes": "perfect scaling over the GPUs, no data loading or evaluation cost",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--micro", action="store_true", help="CPU, micro shapes (dry run)")
    parser.add_argument("--steps", type=int, help="timed steps (default 100; micro 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; micro 1)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--chunked-loss",
        action="store_true",
        help="the chunked cross-entropy (default: the full logits, as on a GPU)",
    )
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    if not args.micro and not torch.cuda.is_available():
        parser.error("no usable CUDA device (use --micro for the CPU dry run)")
    device = torch.device("cpu" if args.micro else "cuda")
    figures = measure(
        MICRO_SHAPE if args.micro else GPU_SHAPE,
        device,
        args.steps or (3 if args.micro else 100),
        args.warmup if args.warmup is not None else (1 if args.micro else 5),
        compile_model=not (args.no_compile or args.micro),
        chunked_loss=args.chunked_loss,
    )
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
