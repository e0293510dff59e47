"""pretrain: train llmpipe's GPT on the pretrain corpus and export it as a Hugging Face model.

One process: `python -m stages.pretrain`. N processes (GPUs, or CPU with gloo):
`torchrun --standalone --nproc_per_node N -m stages.pretrain`.
"""

from pathlib import Path

from llmpipe.io import write_metrics
from llmpipe.params import load_stage_params
from llmpipe.pretrain import PretrainPaths, pretrain
from llmpipe.stage import run_main

PATHS = PretrainPaths(
    tokens_dir=Path("data/tokens/pretrain"),
    tokenizer_dir=Path("data/tokenizer"),
    model_dir=Path("data/pretrain/model"),
    checkpoint_dir=Path("data/pretrain/checkpoint"),
    live_dir=Path("dvclive/pretrain"),
)


def main() -> None:
    shared, params = load_stage_params("pretrain")
    metrics = pretrain(params, shared.seed, PATHS)
    if metrics is not None:  # rank 0 only
        write_metrics("pretrain", metrics)
        print(f"val perplexity {metrics['val_perplexity']} (unigram baseline "
              f"{metrics['unigram_val_perplexity']}); {metrics['perf']['tokens_per_s']:,.0f} "
              f"tokens/s -> {PATHS.model_dir}")


if __name__ == "__main__":
    run_main(main)
