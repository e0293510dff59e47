"""rl_baseline: the finetuned policy, where grpo and reinforce both start, measured once on the
held-out prompts (reward model, gold score, KL, fluency, diversity): their "before"."""

from llmpipe import layout
from llmpipe.params import load_stage_params
from llmpipe.rl.heldout import HeldoutMeasure, HeldoutSettings, write_baseline
from llmpipe.rl.params import RlBaselineParams
from llmpipe.stage import run_main


def main() -> None:
    shared, p = load_stage_params(RlBaselineParams)
    measure = HeldoutMeasure.load(HeldoutSettings.from_params(p, shared.seed))
    report = write_baseline(measure)
    print(
        f"{len(measure.prompts)} held-out prompts: gold score {report['gold_score']:.3f}, "
        f"reward model {report['reward_model_score']:.3f} -> {layout.RL_BASELINE}"
    )


if __name__ == "__main__":
    run_main(main)
