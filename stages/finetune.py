"""finetune: train every weight of the base model on the finetune corpus."""

from llmpipe import layout
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.runtime import writes_outputs
from llmpipe.stage import run_main
from llmpipe.train.causal_lm import run_stage
from llmpipe.train.params import FinetuneParams


def main() -> None:
    shared, p = load_stage_params(FinetuneParams)
    run = run_stage(
        "finetune",
        p,
        shared.seed,
        layout.tokens("finetune"),
        layout.scratch_dir("finetune"),
        layout.live_dir("finetune"),
    )
    if not writes_outputs():  # under a launcher, one process writes
        return
    with atomic_dir(layout.FINETUNE_MODEL) as tmp:
        run.result.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
    write_metrics("finetune", run.metrics(p.base))
    run.write_items("finetune")
    print(
        f"val perplexity {run.base_perplexity:.2f} -> {run.perplexity:.2f} (best step "
        f"{run.result.best_step} of {run.result.steps}) -> {layout.FINETUNE_MODEL}"
    )


if __name__ == "__main__":
    run_main(main)
