"""lora: train a peft LoRA adapter on the same base and data as finetune; save the adapter and
the merged model."""

from llmpipe import layout
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.runtime import writes_outputs
from llmpipe.stage import run_main
from llmpipe.train.causal_lm import run_stage
from llmpipe.train.lora import lora_config, parameter_counts, save_adapter
from llmpipe.train.params import LoraParams


def main() -> None:
    from peft import get_peft_model

    shared, p = load_stage_params(LoraParams)
    run = run_stage(
        "lora",
        p,
        shared.seed,
        layout.tokens("finetune"),
        layout.scratch_dir("lora"),
        layout.live_dir("lora"),
        adapt=lambda base: get_peft_model(base, lora_config(base, p)),
    )
    if not writes_outputs():  # under a launcher, one process writes
        return
    model = run.result.model
    trainable, total = parameter_counts(model)
    with atomic_dir(layout.LORA_ADAPTER) as tmp:
        save_adapter(model, tmp)
    with atomic_dir(layout.LORA_MERGED) as tmp:
        model.merge_and_unload().save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
    run.write_items("lora")
    write_metrics(
        "lora",
        {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_percent": 100 * trainable / total,
            **run.metrics(p.base),
        },
    )
    print(
        f"LoRA r={p.r}: {trainable:,} of {total:,} parameters trained; val perplexity "
        f"{run.base_perplexity:.2f} -> {run.perplexity:.2f} -> {layout.LORA_MERGED}"
    )


if __name__ == "__main__":
    run_main(main)
