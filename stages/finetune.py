"""finetune: train every weight of the base model on the finetune corpus."""

from pathlib import Path

from llmpipe.causal_lm import run_stage
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main

TOKENS_DIR = Path("data/tokens/finetune")
OUT_DIR = Path("data/finetune")
LIVE_DIR = Path("dvclive/finetune")


def main() -> None:
    shared, p = load_stage_params("finetune")
    run = run_stage("finetune", p, shared.seed, TOKENS_DIR, OUT_DIR / "trainer", LIVE_DIR)
    with atomic_dir(OUT_DIR / "model") as tmp:
        run.result.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
    write_metrics("finetune", run.metrics(p.base))
    print(f"val perplexity {run.base_perplexity:.2f} -> {run.perplexity:.2f} (best step "
          f"{run.result.best_step} of {run.result.steps}) -> {OUT_DIR / 'model'}")


if __name__ == "__main__":
    run_main(main)
