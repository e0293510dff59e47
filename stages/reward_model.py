"""reward_model: a one-output classifier initialised from the finetuned model and trained on
the preference pairs with TRL's RewardTrainer."""

from llmpipe.stage import run_main, use_one_gpu_unless_launched

use_one_gpu_unless_launched()  # before torch is imported

from pathlib import Path  # noqa: E402

from llmpipe.io import atomic_dir, read_jsonl, write_metrics  # noqa: E402
from llmpipe.params import load_stage_params  # noqa: E402
from llmpipe.rlhf import gold_agreement, pairwise_report, train_reward_model  # noqa: E402

POLICY_DIR = Path("data/finetune/model")
PREFERENCES_DIR = Path("data/preferences")
OUT_DIR = Path("data/reward_model")
LIVE_DIR = Path("dvclive/reward_model")


def main() -> None:
    shared, p = load_stage_params("reward_model")
    train = read_jsonl(PREFERENCES_DIR / "train.jsonl")
    heldout = read_jsonl(PREFERENCES_DIR / "heldout.jsonl")
    fresh = read_jsonl(PREFERENCES_DIR / "fresh.jsonl")
    model, tokenizer, trained_pairs = train_reward_model(POLICY_DIR, train, heldout, p,
                                                         shared.seed, LIVE_DIR)
    held = pairwise_report(model, tokenizer, heldout)
    agreement, counted = gold_agreement(model, tokenizer, fresh)
    with atomic_dir(OUT_DIR / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # TRL loads a reward model's tokenizer from its folder
    write_metrics("reward_model", {
        "train_pairs": trained_pairs,  # RewardTrainer drops pairs longer than max_length
        "dropped_pairs": len(train) - trained_pairs,
        "heldout_accuracy": round(held["accuracy"], 4),
        "heldout_mean_margin": round(held["mean_margin"], 4),
        "train_accuracy": round(pairwise_report(model, tokenizer, train)["accuracy"], 4),
        "chance_accuracy": 0.5,
        "gold_agreement_fresh": round(agreement, 4),
        "fresh_pairs": counted,
    })
    print(f"held-out accuracy {held['accuracy']:.3f}, gold agreement on {counted} fresh pairs "
          f"{agreement:.3f} -> {OUT_DIR / 'model'}")


if __name__ == "__main__":
    run_main(main)
