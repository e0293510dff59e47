"""LoRA against full finetuning: validation perplexity per rank, adapted layers and learning rate.

    python bench/lora_sweep.py [--ranks 4 8 16 32] [--steps N]
    python bench/lora_sweep.py --controls

`--controls` puts the like-for-like lines beside the lora stage: full finetuning (the finetune
section) with the embedding frozen, as it is under LoRA (the token embedding, which is also the
head, and the positions: about 40% of the parameters), and with it trained (the finetune stage);
the lora stage, and the lora stage with the embedding trained as well.

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


def embeddings(model) -> list:
    """The GPT-2 model's token embedding (tied to the head) and position embedding."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [inner.transformer.wte.weight, inner.transformer.wpe.weight]


def lora_run(p: LoraParams, seed: int, train_embeddings: bool = False) -> dict:
    from peft import get_peft_model

    def adapt(base):
        model = get_peft_model(base, lora_config(base, p))
        for weight in embeddings(model) if train_embeddings else []:
            weight.requires_grad_(True)
        return model

    return stage_run("lora", p, seed, adapt)


def full_run(p: FinetuneParams, seed: int, freeze_embeddings: bool) -> dict:
    def adapt(model):
        for weight in embeddings(model) if freeze_embeddings else []:
            weight.requires_grad_(False)
        return model

    return stage_run("finetune", p, seed, adapt)


def stage_run(stage: str, p, seed: int, adapt) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        run = run_stage(
            stage,
            p,
            seed,
            layout.tokens("finetune"),
            Path(scratch) / "work",
            Path(scratch) / "live",
            adapt=adapt,
        )
    trainable, total = parameter_counts(run.result.model)
    return {"trainable %": 100 * trainable / total, **run.metrics(p.base)}


def controls(seed: int) -> None:
    _, lora = load_stage_params(LoraParams)
    _, full = load_stage_params(FinetuneParams)
    runs = [
        ("full finetuning, embedding frozen (like for like)", lambda: full_run(full, seed, True)),
        ("full finetuning (the finetune stage)", lambda: full_run(full, seed, False)),
        ("LoRA (the lora stage)", lambda: lora_run(lora, seed)),
        ("LoRA and the embedding trained", lambda: lora_run(lora, seed, True)),
    ]
    rows = [
        "| run | trained % | learning rate | val perplexity | bits/byte | best step / steps "
        "| wall s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, run in runs:
        started = time.perf_counter()
        m = run()
        rate = (lora if "LoRA" in name else full).learning_rate
        rows.append(
            f"| {name} | {m['trainable %']:.2f} | {rate:.2g} | {m['val_perplexity']:.2f} | "
            f"{m['val_bits_per_byte']:.4f} | {m['best_step']} / {m['steps']} | "
            f"{time.perf_counter() - started:.0f} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, help="max_steps (default: the lora section's)")
    parser.add_argument("--controls", action="store_true", help="the like-for-like lines")
    args = parser.parse_args()
    shared, p = load_stage_params(LoraParams)
    if args.controls:
        controls(shared.seed)
        return
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
