"""pretrain: train llmpipe's GPT on the pretrain corpus and export it as a Hugging Face model.

One process: `python -m stages.pretrain`. N processes (GPUs, or CPU with gloo):
`torchrun --standalone --nproc_per_node N -m stages.pretrain`.
"""

from llmpipe import layout
from llmpipe.io import write_metrics
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main
from llmpipe.train.params import PretrainParams
from llmpipe.train.pretrain import PretrainPaths, pretrain

PATHS = PretrainPaths(
    tokens_dir=layout.tokens("pretrain"),
    tokenizer_dir=layout.TOKENIZER,
    model_dir=layout.PRETRAIN_MODEL,
    checkpoint_dir=layout.PRETRAIN_CHECKPOINT,
    live_dir=layout.live_dir("pretrain"),
    items_file=layout.items_file("pretrain"),
)


def main() -> None:
    shared, params = load_stage_params(PretrainParams)
    metrics = pretrain(params, shared.seed, PATHS)
    if metrics is not None:  # the writing process only (runtime.writes_outputs)
        write_metrics("pretrain", metrics)
        print(
            f"val perplexity {metrics['val_perplexity']:.2f} (unigram baseline "
            f"{metrics['unigram_val_perplexity']:.2f}); {metrics['perf']['tokens_per_s']:,.0f} "
            f"tokens/s -> {PATHS.model_dir}"
        )


if __name__ == "__main__":
    run_main(main)
