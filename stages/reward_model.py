"""reward_model: a one-output classifier initialised from the finetuned model and trained on
the preference pairs with TRL's RewardTrainer."""

from llmpipe import layout
from llmpipe.data.chat import PromptFormat
from llmpipe.evaluation.intervals import estimate, interval_metrics
from llmpipe.io import atomic_dir, rounded, write_json, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.rl.params import RewardModelParams
from llmpipe.rl.preferences import read_fresh, read_pairs
from llmpipe.rl.rlhf import gold_agreement, pairwise_report, train_reward_model
from llmpipe.runtime import writes_outputs
from llmpipe.stage import run_main


def main() -> None:
    shared, p = load_stage_params(RewardModelParams)
    train = read_pairs(layout.PREFERENCES, "train")
    heldout = read_pairs(layout.PREFERENCES, "heldout")
    fresh = read_fresh(layout.PREFERENCES)
    prompt_format = PromptFormat.read(layout.PREFERENCES)
    model, tokenizer, trained_pairs = train_reward_model(
        layout.FINETUNE_MODEL,
        train,
        heldout,
        prompt_format,
        p,
        shared.seed,
        layout.live_dir("reward_model"),
    )
    if not writes_outputs():  # under a launcher, one process measures and writes
        return
    held = pairwise_report(model, tokenizer, prompt_format, heldout)
    agreed = gold_agreement(model, tokenizer, prompt_format, fresh)
    agreement = sum(agreed) / max(len(agreed), 1)
    with atomic_dir(layout.REWARD_MODEL) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # what grpo, reinforce and evaluate score with
    write_metrics(
        "reward_model",
        {
            "train_pairs": trained_pairs,  # RewardTrainer drops pairs longer than max_length
            "dropped_pairs": len(train) - trained_pairs,
            # with their 95% intervals over the pairs
            **interval_metrics("heldout_accuracy", estimate(held["correct"])),
            **interval_metrics("heldout_mean_margin", estimate(held["margins"])),
            "train_accuracy": pairwise_report(model, tokenizer, prompt_format, train)["accuracy"],
            "chance_accuracy": 0.5,
            **(
                interval_metrics("gold_agreement_fresh", estimate(agreed))
                if agreed
                else {"gold_agreement_fresh": 0.0}
            ),
            "fresh_pairs": len(agreed),
        },
    )
    # per held-out pair: what the accuracy and the margin are computed from
    write_json(
        layout.items_file("reward_model"),
        rounded(
            [
                {"pair": i, "prompt": q["prompt"], "correct": c, "margin": m}
                for i, (q, c, m) in enumerate(
                    zip(heldout, held["correct"], held["margins"], strict=True)
                )
            ]
        ),
    )
    print(
        f"held-out accuracy {held['accuracy']:.3f}, gold agreement on {len(agreed)} fresh pairs "
        f"{agreement:.3f} -> {layout.REWARD_MODEL}"
    )


if __name__ == "__main__":
    run_main(main)
