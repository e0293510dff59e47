"""grpo: TRL's GRPOTrainer on the finetuned policy against the reward model; the policy is
measured before and after on held-out prompts with the same sampling seed."""

from llmpipe.stage import run_main, use_one_gpu_unless_launched

use_one_gpu_unless_launched()  # before torch is imported

from pathlib import Path  # noqa: E402

from llmpipe.causal_lm import load_base  # noqa: E402
from llmpipe.io import atomic_dir, read_jsonl, write_json, write_metrics  # noqa: E402
from llmpipe.params import load_stage_params  # noqa: E402
from llmpipe.rlhf import load_judges, policy_report, reward_functions, run_grpo  # noqa: E402

POLICY_DIR = Path("data/finetune/model")
REWARD_DIR = Path("data/reward_model/model")
PREFERENCES_DIR = Path("data/preferences")
OUT_DIR = Path("data/grpo")
LIVE_DIR = Path("dvclive/grpo")
FIGURES = ("reward_model_score", "gold_score", "kl_to_reference", "completion_length")


def main() -> None:
    shared, p = load_stage_params("grpo")
    train_prompts = [r["prompt"] for r in read_jsonl(PREFERENCES_DIR / "prompts_train.jsonl")]
    heldout = [r["prompt"] for r in read_jsonl(PREFERENCES_DIR / "prompts_heldout.jsonl")]
    gold, reward_model, reward_tokenizer = load_judges(PREFERENCES_DIR, REWARD_DIR)
    reference, tokenizer = load_base(str(POLICY_DIR))

    def report(policy):  # the same prompts and sampling seed before and after
        return policy_report(policy, reference, tokenizer, reward_model, reward_tokenizer, gold,
                             heldout, p.eval_samples, p.max_completion_length, p.temperature,
                             shared.seed)

    before = report(reference)
    policy, steps = run_grpo(POLICY_DIR, reward_functions(REWARD_DIR, p), train_prompts, p,
                             shared.seed, LIVE_DIR)
    after = report(policy)
    with atomic_dir(OUT_DIR / "model") as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "samples.json", {"before": before["samples"], "after": after["samples"]})
    metrics = {f"{when}_{key}": round(report_[key], 4)
               for when, report_ in (("before", before), ("after", after)) for key in FIGURES}
    metrics["after_kl_per_token"] = round(after["kl_to_reference"]
                                          / max(after["completion_length"], 1), 4)
    metrics["gold_gain"] = round(after["gold_score"] - before["gold_score"], 4)
    metrics["reward_model_gain"] = round(after["reward_model_score"]
                                         - before["reward_model_score"], 4)
    # Proxy up while gold does not follow is reward hacking: say so, the metrics show it too.
    metrics["reward_hacking_suspected"] = metrics["reward_model_gain"] > 0 >= metrics["gold_gain"]
    metrics.update({"steps": steps, "heldout_prompts": len(heldout)})
    write_metrics("grpo", metrics)
    print(f"held-out gold score {before['gold_score']:.3f} -> {after['gold_score']:.3f}, reward "
          f"model {before['reward_model_score']:.3f} -> {after['reward_model_score']:.3f}, KL "
          f"{after['kl_to_reference']:.3f} -> {OUT_DIR / 'model'}")
    if metrics["reward_hacking_suspected"]:
        print("warning: the reward model's score rose but the gold score did not: reward hacking")


if __name__ == "__main__":
    run_main(main)
