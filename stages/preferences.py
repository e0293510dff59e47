"""preferences: prompts from the finetune corpus, completions sampled from the finetuned model,
chosen and rejected by the gold scorer (or a ready preference set, split by prompt)."""

from llmpipe import layout
from llmpipe.io import write_metrics
from llmpipe.model.loading import load_causal_lm
from llmpipe.params import load_stage_params
from llmpipe.rl.params import PreferencesParams
from llmpipe.rl.preference_pairs import build_preference_set
from llmpipe.stage import run_main


def main() -> None:
    shared, p = load_stage_params(PreferencesParams)
    policy, tokenizer = load_causal_lm(layout.FINETUNE_MODEL)
    preferences, metrics = build_preference_set(
        p, shared.seed, policy, tokenizer, layout.tokens("finetune")
    )
    preferences.write(layout.PREFERENCES)
    write_metrics("preferences", metrics)
    print(
        f"{metrics['train_pairs']} train and {metrics['heldout_pairs']} held-out pairs "
        f"(tie rate {metrics['tie_rate']:.3f}) -> {layout.PREFERENCES}"
    )


if __name__ == "__main__":
    run_main(main)
