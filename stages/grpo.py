"""grpo: TRL's GRPOTrainer on the finetuned policy against the reward model; the policy is
measured before and after on held-out prompts with the same sampling seed."""

from llmpipe import layout
from llmpipe.io import atomic_dir, write_json, write_metrics
from llmpipe.loading import load_causal_lm
from llmpipe.params import GrpoParams, load_stage_params
from llmpipe.preferences import read_prompts
from llmpipe.rlhf import (
    before_after_metrics,
    check_grpo_launch,
    load_judges,
    policy_report,
    reward_functions,
    run_grpo,
)
from llmpipe.runtime import is_main_process
from llmpipe.sampling import Sampling
from llmpipe.stage import run_main


def main() -> None:
    shared, p = load_stage_params(GrpoParams)
    check_grpo_launch(p)  # before minutes of measuring
    train_prompts = read_prompts(layout.PREFERENCES, "train")
    heldout = read_prompts(layout.PREFERENCES, "heldout")
    # The same prompts and sampling seed before and after, measured once: by the main process
    # under a launcher (the others build the trainer and wait for it in their first
    # collective, within the Trainer's ddp_timeout of 30 minutes).
    sampling = Sampling(p.eval_samples, p.max_completion_length, p.temperature, shared.seed)
    main_process = is_main_process()
    if main_process:
        reference, tokenizer = load_causal_lm(layout.FINETUNE_MODEL)
        judges = load_judges(layout.PREFERENCES, layout.REWARD_MODEL, reference)
        before = policy_report(reference, tokenizer, heldout, sampling, judges)
        curve_prompts = heldout[:p.curve_prompts]

        def heldout_report(model):
            return policy_report(model, tokenizer, curve_prompts, sampling, judges)
    policy, steps = run_grpo(layout.FINETUNE_MODEL, reward_functions(layout.REWARD_MODEL, p),
                             train_prompts, p, shared.seed, layout.live_dir("grpo"),
                             heldout_report if main_process else None)
    if not main_process:
        return
    after = policy_report(policy, tokenizer, heldout, sampling, judges)
    with atomic_dir(layout.GRPO_MODEL) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "samples.json", {"before": before["samples"], "after": after["samples"]})
    metrics = {**before_after_metrics(before, after, p.degeneration_distinct_drop,
                                      p.degeneration_fluency_rise),
               "steps": steps, "heldout_prompts": len(heldout)}
    write_metrics("grpo", metrics)
    print(f"held-out gold score {before['gold_score']:.3f} -> {after['gold_score']:.3f}, reward "
          f"model {before['reward_model_score']:.3f} -> {after['reward_model_score']:.3f}, KL "
          f"{after['kl_to_reference']:.3f} -> {layout.GRPO_MODEL}")
    if metrics["reward_hacking_suspected"]:
        print("warning: the reward model's score rose but the gold score did not: reward hacking")
    if metrics["degeneration_suspected"]:
        print(f"warning: the gold score rose while the text degenerated: distinct bigrams "
              f"{metrics['distinct_2_change']:+.0%}, the SFT model's loss on the completions "
              f"{metrics['reference_loss_change']:+.2f} nats/token (the judges like what is no "
              "longer text; see the samples)")


if __name__ == "__main__":
    run_main(main)
