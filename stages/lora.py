"""lora: train a peft LoRA adapter on the same base and data as finetune; save the adapter and
the merged model."""

import time
from pathlib import Path

from llmpipe.causal_lm import load_base, open_token_data, train, val_perplexity
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.lora import lora_config, parameter_counts
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main

TOKENS_DIR = Path("data/tokens/finetune")
OUT_DIR = Path("data/lora")
LIVE_DIR = Path("dvclive/lora")


def main() -> None:
    from peft import get_peft_model

    started = time.perf_counter()
    shared, p = load_stage_params("lora")
    base, tokenizer = load_base(p.base, p.trust_remote_code)
    train_bin, val_bin = open_token_data(TOKENS_DIR, base, p.base)
    base_ppl = val_perplexity(base, val_bin, p)
    model = get_peft_model(base, lora_config(base, p))
    trainable, total = parameter_counts(model)
    result = train(model, p, "lora", shared.seed, train_bin, val_bin, OUT_DIR / "trainer",
                   LIVE_DIR)
    ppl = val_perplexity(result.model, val_bin, p)
    with atomic_dir(OUT_DIR / "adapter") as tmp:
        result.model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    with atomic_dir(OUT_DIR / "merged") as tmp:
        result.model.merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_metrics("lora", {
        "base": p.base,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "base_val_perplexity": round(base_ppl, 4),
        "val_perplexity": round(ppl, 4),
        "train_loss": round(result.train_loss, 6),
        "steps": result.steps,
        "best_step": result.best_step,
        "perf": {"tokens_per_s": round(result.tokens_per_s, 1),
                 "peak_memory_mb": round(result.peak_memory_mb, 1),
                 "wall_s": round(time.perf_counter() - started, 1)},
    })
    print(f"LoRA r={p.r}: {trainable:,} of {total:,} parameters trained; val perplexity "
          f"{ppl:.2f} -> {OUT_DIR}")


if __name__ == "__main__":
    run_main(main)
