"""The RLHF pair (grpo, reinforce): its reward from params, its run for llmpipe.rl.harness, the
held-out measurement (the judges, rl_baseline's sampling settings and compute dtype) and the
"before" figures that rl_baseline measures once for both.

Both start from the finetuned policy and are judged on the same held-out prompts with the same
sampling seed, so one measurement of the starting policy serves both: before this, each stage
measured it again (identical figures, twice the time)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from llmpipe import layout
from llmpipe.data.chat import PromptFormat, message_text
from llmpipe.errors import DataError, ParamsError
from llmpipe.evaluation.intervals import Estimate, interval_metrics, level_metrics, ratio_estimate
from llmpipe.io import atomic_dir, write_json, write_metrics
from llmpipe.model.loading import load_causal_lm, load_reward_model, load_tokenizer
from llmpipe.rl.degeneration import rising_words
from llmpipe.rl.harness import Rewards, RlRun
from llmpipe.rl.judges import HELDOUT_JUDGES
from llmpipe.rl.params import GrpoParams, ReinforceParams, RlBaselineParams
from llmpipe.rl.preferences import read_gold_spec, read_prompts
from llmpipe.rl.rlhf import Judges, load_judges, policy_report, reward_scores
from llmpipe.rl.sampling import Sampling
from llmpipe.runtime import compute_autocast, default_device, frozen_reference, writes_outputs


def length_penalty(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """A shaping reward: minus the completion's length in tokens; its weight in params sets
    the strength."""
    return [-float(len(ids)) for ids in completion_ids]


def rlhf_rewards(reward: str, length_penalty_weight: float, judges: Judges | None) -> Rewards:
    """The RLHF pair's reward from its params: the reward model on prompt + completion (scoring
    the tokens it was trained on: TRL's own scoring of a reward model drops the BOS its trainer
    added) or the gold scorer on the completion, plus the length penalty. Prompts and
    completions come as text, or as messages under a chat format. Outside a launch's main
    process (no judges) the reward model is loaded here."""
    if reward == "gold":
        gold = judges.gold if judges else read_gold_spec(layout.PREFERENCES).load()

        def score(prompts, completions, **kwargs):
            return gold([message_text(c) for c in completions])
    else:
        if judges is None:
            reward_tokenizer = load_tokenizer(layout.REWARD_MODEL)
            model = load_reward_model(layout.REWARD_MODEL, reward_tokenizer)
            prompt_format = PromptFormat.read(layout.PREFERENCES)
        else:
            model, reward_tokenizer = judges.reward_model, judges.reward_tokenizer
            prompt_format = judges.prompt_format

        def score(prompts, completions, **kwargs):
            return reward_scores(
                model,
                reward_tokenizer,
                prompt_format,
                [message_text(q) for q in prompts],
                [message_text(c) for c in completions],
            )

    score.__name__ = reward  # TRL logs each reward function's curve under its name
    rewards: Rewards = [(score, 1.0)]
    if length_penalty_weight > 0:
        rewards.append((length_penalty, length_penalty_weight))
    return rewards


def rlhf_run(p: GrpoParams | ReinforceParams, separate_reward_model: bool = False) -> RlRun:
    """The RLHF pair's run: from the finetuned policy on the preference set's train prompts,
    measured on its held-out prompts as rl_baseline measured the starting policy.
    `separate_reward_model`: the reward loads its own reward model in every process (GRPO under
    a launcher, where only the main process measures)."""
    settings, before = read_baseline()
    measure = HeldoutMeasure.load(settings) if writes_outputs() else None
    judges = None if separate_reward_model or measure is None else measure.judges
    return RlRun(
        policy_dir=layout.FINETUNE_MODEL,
        rows=[{"prompt": q} for q in read_prompts(layout.PREFERENCES, "train")],
        prompt_format=PromptFormat.read(layout.PREFERENCES),
        rewards=rlhf_rewards(p.reward, p.length_penalty, judges),
        measure=measure,
        before=before,
        gains={
            "gold_score": "gold_gain",
            "reward_model_score": "reward_model_gain",
            **HELDOUT_JUDGES,
        },
        load_reference=lambda: measure.reference,
        verdicts=lambda before, after, metrics: rlhf_verdicts(
            before, after, metrics, p.degeneration_distinct_drop, p.degeneration_fluency_rise
        ),
        curve_prompts=p.curve_prompts,
        curve_interval=p.curve_interval,
    )


def kl_per_token(report: dict) -> Estimate:
    """KL to the reference per completion token: each prompt's KL over its tokens, as a ratio
    over the prompts (llmpipe.evaluation.intervals.ratio_estimate)."""
    items = report["items"]
    return ratio_estimate(
        [i["kl_to_reference"] for i in items], [i["completion_length"] for i in items]
    )


def rlhf_verdicts(
    before: dict, after: dict, metrics: dict, max_distinct_drop: float, max_fluency_rise: float
) -> dict:
    """KL per token and three flags, read from the paired intervals. Reward hacking: the proxy
    rose (its interval above 0) while the gold score did not (its interval reaches 0).
    Over-optimisation: the proxy rose while no held-out judge did (llmpipe.rl.judges: the gain
    is the proxy's and the gold scorer's own, e.g. one word both like), or diversity collapsed
    (distinct bigrams fell by more than `max_distinct_drop`, a share). Degeneration: the gold
    score rose while diversity or fluency (the reference's loss rose by more than
    `max_fluency_rise` nats per token) collapsed: the judges like what is no longer text. The
    words whose share of completions rose most are returned under "rising_words" (a
    string, for the report and the samples)."""
    gold_rose = metrics["gold_gain_lo"] > 0
    proxy_rose = metrics["reward_model_gain_lo"] > 0
    heldout_rose = any(metrics[f"{gain}_lo"] > 0 for gain in HELDOUT_JUDGES.values())
    distinct_2_change = after["distinct_2"] / max(before["distinct_2"], 1e-9) - 1
    reference_loss_change = after["reference_loss"] - before["reference_loss"]
    collapsed = distinct_2_change < -max_distinct_drop
    words = rising_words(before.get("word_shares", {}), after.get("word_shares", {}))
    return {
        "overoptimisation_suspected": (proxy_rose and not heldout_rose) or collapsed,
        "rising_words": ", ".join(f"{w} {a:.0%} -> {b:.0%}" for w, a, b in words),
        **interval_metrics("after_kl_per_token", kl_per_token(after)),
        "reward_hacking_suspected": metrics["reward_model_gain_lo"] > 0 and not gold_rose,
        "distinct_2_change": distinct_2_change,
        "reference_loss_change": reference_loss_change,
        "degeneration_suspected": gold_rose
        and (collapsed or reference_loss_change > max_fluency_rise),
    }


BASELINE_FILE = "baseline.json"  # in layout.RL_BASELINE: the settings and the report


@dataclass(frozen=True)
class HeldoutSettings:
    """How a policy is measured on the held-out prompts (rl_baseline's params and the seed)."""

    eval_samples: int
    max_completion_length: int
    temperature: float
    dtype: str
    seed: int

    @classmethod
    def from_params(cls, p: RlBaselineParams, seed: int) -> HeldoutSettings:
        return cls(p.eval_samples, p.max_completion_length, p.temperature, p.dtype, seed)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.eval_samples, self.max_completion_length, self.temperature, self.seed)


@dataclass
class HeldoutMeasure:
    """The finetuned policy as the reference (frozen in the settings' dtype: also REINFORCE's
    KL reference), the judges, and the held-out prompts: `report(model)` measures a policy."""

    settings: HeldoutSettings
    judges: Judges
    tokenizer: object
    prompts: list[str]

    @classmethod
    def load(cls, settings: HeldoutSettings) -> HeldoutMeasure:
        reference, tokenizer = load_causal_lm(layout.FINETUNE_MODEL)
        frozen_reference(reference, settings.dtype)
        judges = load_judges(layout.PREFERENCES, layout.REWARD_MODEL, reference)
        return cls(settings, judges, tokenizer, read_prompts(layout.PREFERENCES, "heldout"))

    @property
    def reference(self):
        return self.judges.reference

    def report(self, model, first: int | None = None) -> dict:
        """policy_report under the settings' autocast (the CPU's too, where REINFORCE offloads
        the reference), on the held-out prompts or the first of them."""
        dtype = self.settings.dtype
        with compute_autocast(default_device(), dtype), compute_autocast("cpu", dtype):
            return policy_report(
                model,
                self.tokenizer,
                self.prompts[:first],
                self.settings.sampling,
                self.judges,
            )


def write_baseline(measure: HeldoutMeasure) -> dict:
    """rl_baseline's outputs: the report of the starting policy with its settings, and its
    figures as metrics."""
    report = measure.report(measure.reference)
    with atomic_dir(layout.RL_BASELINE) as tmp:
        write_json(
            tmp / BASELINE_FILE,
            {
                "settings": asdict(measure.settings),
                "heldout_prompts": len(measure.prompts),
                "report": report,
            },
        )
    write_metrics("rl_baseline", level_metrics(report))
    return report


def read_baseline(directory: Path = layout.RL_BASELINE) -> tuple[HeldoutSettings, dict]:
    """The settings every later measurement uses, and the "before" report."""
    path = directory / BASELINE_FILE
    if not path.exists():
        raise DataError(f"{path}: missing (run the rl_baseline stage first)")
    baseline = json.loads(path.read_text())
    return HeldoutSettings(**baseline["settings"]), baseline["report"]


def check_same_dtype(stage: str, dtype: str, settings: HeldoutSettings) -> None:
    """REINFORCE's reference is the judges' (held in the measurement's dtype): one dtype."""
    if dtype != settings.dtype:
        raise ParamsError(
            f"{stage}.dtype: {dtype} differs from rl_baseline.dtype "
            f"({settings.dtype}): the reference it trains against is the one "
            "that measures it; set both alike"
        )
