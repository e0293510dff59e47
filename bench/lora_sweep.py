"""LoRA against full finetuning: validation perplexity per rank, adapted layers and learning rate.

    python bench/lora_sweep.py [--ranks 4 8 16 32] [--steps N]

Run after `dvc repro finetune` (it reads the pretrained model, the finetune corpus's tokens and
the finetune stage's metrics, the line to reach). Every run is the lora stage's own training
(llmpipe.train.causal_lm.run_stage, params.yaml's lora section) with one thing changed, one run at a
time, on the same validation windows: attention only (GPT-2's c_attn and both c_proj, the old
default) against every linear layer (c_fc too, as "LoRA Without Regret", Thinking Machines
2025, recommends), at the lora section's learning rate and at a third of it.
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from llmpipe import layout
from llmpipe.params import load_stage_params
from llmpipe.train.causal_lm import run_stage
from llmpipe.train.lora import lora_config, parameter_counts
from llmpipe.train.params import FinetuneParams, LoraParams

ATTENTION = ["c_attn", "c_proj"]  # c_proj: the attention's and the MLP's output projections
EVERY_LINEAR = ["c_attn", "c_proj", "c_fc"]


def lora_run(p: LoraParams, seed: int) -> dict:
    from peft import get_peft_model

    with tempfile.TemporaryDirectory() as scratch:
        run = run_stage(
            "lora",
            p,
            seed,
            layout.tokens("finetune"),
            Path(scratch) / "work",
            Path(scratch) / "live",
            adapt=lambda base: get_peft_model(base, lora_config(base, p)),
        )
    trainable, total = parameter_counts(run.result.model)
    return {"trainable %": 100 * trainable / total, **run.metrics(p.base)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, help="max_steps (default: the lora section's)")
    args = parser.parse_args()
    shared, p = load_stage_params(LoraParams)
    if args.steps:
        p = dataclasses.replace(p, max_steps=args.steps)
    lr = p.learning_rate
    runs = [("attention", 8, lr)] + [("every linear", r, lr) for r in args.ranks]
    runs += [("every linear", 16, lr / 3)]
    finetune = json.loads(layout.metrics_file("finetune").read_text())
    print(
        f"full finetuning (metrics/finetune.json): val perplexity "
        f"{finetune['val_perplexity']:.2f}, base {finetune['base_val_perplexity']:.2f}"
    )
    header = (
        "| adapted | r | alpha | learning rate | trained % | val perplexity | bits/byte "
        "| best step / steps | wall s |"
    )
    rows = [header, "|" + "---|" * 9]
    for modules, r, rate in runs:
        q = dataclasses.replace(
            p,
            r=r,
            alpha=2 * r,
            target_modules=(ATTENTION if modules == "attention" else EVERY_LINEAR),
            learning_rate=rate,
        )
        started = time.perf_counter()
        m = lora_run(q, shared.seed)
        rows.append(
            f"| {modules} | {r} | {2 * r} | {rate:.2g} | {m['trainable %']:.2f} | "
            f"{m['val_perplexity']:.2f} | {m['val_bits_per_byte']:.4f} | "
            f"{m['best_step']} / {m['steps']} | {time.perf_counter() - started:.0f} |"
        )
        print(rows[-1], flush=True)
    finetune_lr = load_stage_params(FinetuneParams)[1].learning_rate
    rows.append(
        f"| full finetuning | - | - | {finetune_lr:.2g} | 100 | "
        f"{finetune['val_perplexity']:.2f} | {finetune['val_bits_per_byte']:.4f} | "
        f"{finetune['best_step']} / {finetune['steps']} | "
        f"{finetune['perf']['wall_s']:.0f} |"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
