"""finetune: train every weight of the base model on the finetune corpus."""

import time
from pathlib import Path

from llmpipe.causal_lm import load_base, open_token_data, train, val_perplexity
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main

TOKENS_DIR = Path("data/tokens/finetune")
OUT_DIR = Path("data/finetune")
LIVE_DIR = Path("dvclive/finetune")


def main() -> None:
    started = time.perf_counter()
    shared, p = load_stage_params("finetune")
    model, tokenizer = load_base(p.base, p.trust_remote_code)
    train_bin, val_bin = open_token_data(TOKENS_DIR, model, p.base)
    base_ppl = val_perplexity(model, val_bin, p)
    result = train(model, p, "finetune", shared.seed, train_bin, val_bin,
                   OUT_DIR / "trainer", LIVE_DIR)
    ppl = val_perplexity(result.model, val_bin, p)
    with atomic_dir(OUT_DIR / "model") as tmp:
        result.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_metrics("finetune", {
        "base": p.base,
        "base_val_perplexity": round(base_ppl, 4),
        "val_perplexity": round(ppl, 4),
        "train_loss": round(result.train_loss, 6),
        "steps": result.steps,
        "best_step": result.best_step,
        "perf": {"tokens_per_s": round(result.tokens_per_s, 1),
                 "wall_s": round(time.perf_counter() - started, 1)},
    })
    print(f"val perplexity {base_ppl:.2f} -> {ppl:.2f} (best step {result.best_step} of "
          f"{result.steps}) -> {OUT_DIR / 'model'}")


if __name__ == "__main__":
    run_main(main)
