"""lora: train a peft LoRA adapter on the same base and data as finetune; save the adapter and
the merged model."""

from pathlib import Path

from llmpipe.causal_lm import run_stage
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.lora import lora_config, parameter_counts
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main

TOKENS_DIR = Path("data/tokens/finetune")
OUT_DIR = Path("data/lora")
LIVE_DIR = Path("dvclive/lora")


def main() -> None:
    from peft import get_peft_model

    shared, p = load_stage_params("lora")
    run = run_stage("lora", p, shared.seed, TOKENS_DIR, OUT_DIR / "trainer", LIVE_DIR,
                    adapt=lambda base: get_peft_model(base, lora_config(base, p)))
    model = run.result.model
    trainable, total = parameter_counts(model)
    with atomic_dir(OUT_DIR / "adapter") as tmp:
        model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    with atomic_dir(OUT_DIR / "merged") as tmp:
        model.merge_and_unload().save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
    metrics = run.metrics(p.base)
    write_metrics("lora", {"trainable_parameters": trainable, "total_parameters": total,
                           "trainable_percent": round(100 * trainable / total, 4), **metrics})
    print(f"LoRA r={p.r}: {trainable:,} of {total:,} parameters trained; val perplexity "
          f"{run.base_perplexity:.2f} -> {run.perplexity:.2f} -> {OUT_DIR}")


if __name__ == "__main__":
    run_main(main)
