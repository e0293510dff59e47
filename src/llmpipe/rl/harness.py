"""One harness for the four RL stages (grpo, reinforce, task_grpo, task_reinforce): a stage
builds an RlRun (the starting policy, the training prompts, the reward, the measurement and the
"before" report), trains it with one algorithm (TRL's GRPOTrainer: train_with_grpo; the
from-scratch REINFORCE: train_with_reinforce) and ends with finish_rl, which measures the
policy after, saves it and writes one metrics layout: before_* and after_* figures (`_se`
beside those measured per item), the paired gains with their 95% intervals, and the per-item
results in layout.items_file(stage).

The RLHF pair (grpo, reinforce) is measured on the held-out preference prompts with the judges
(reward model, gold scorer, the finetuned policy as KL reference); its "before" is measured once
by rl_baseline for both (before, each stage measured it again: identical figures, twice the
time). The task pair's RlRun is built by llmpipe.task.checkable.task_run: the exact-match
checker as the reward, the test problems as the measurement, task_sft's report as "before"."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from llmpipe import layout
from llmpipe.data.chat import PromptFormat
from llmpipe.evaluation.intervals import (
    estimate,
    gain_metrics,
    item_values,
    level_metrics,
    write_items,
)
from llmpipe.io import atomic_dir, write_json, write_metrics
from llmpipe.model.loading import load_causal_lm
from llmpipe.rl.grpo import run_grpo
from llmpipe.rl.reinforce import config_from, reinforce
from llmpipe.train.tracking import curves_live, log_step

RewardFunction = Callable[..., list[float]]  # TRL's reward-function signature
Rewards = list[tuple[RewardFunction, float]]  # (function, weight)


class Measure(Protocol):
    """How a policy is measured: `report(model)` gives its figures, per-item results under
    "items" and a few samples under "samples"; `report(model, first)` on the first prompts
    alone (the over-optimisation curve)."""

    tokenizer: object

    def report(self, model, first: int | None = None) -> dict: ...


class HeldoutCurve:
    """The over-optimisation curve (Gao, Schulman and Hilton 2022): the policy's gold score,
    reward-model score and KL to the reference on a few held-out prompts, at step 0 and every
    `interval` steps (0: never), logged beside the training curves as heldout/<figure>. Where
    gold stops following the proxy as KL grows is the number to read. The random state is
    restored afterwards, so training draws what it would draw without the curve."""

    def __init__(self, report: Callable[[torch.nn.Module], dict], interval: int, live=None):
        self.report, self.interval, self.live = report, interval, live

    def measure(self, model, step: int) -> None:
        if self.live is None or not self.interval or step % self.interval:
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            was_training = model.training
            figures = self.report(model)
            model.train(was_training)
        points = {key: figures[key] for key in layout.HELDOUT_CURVES}
        if (gold := item_values(figures, "gold_score")) is not None:
            points["gold_score_se"] = estimate(gold).se  # the report card's band
        log_step(self.live, step, points, "heldout/")

    def log_training(self, step: int, figures: dict[str, float]) -> None:
        log_step(self.live, step, figures)


@dataclass
class RlRun:
    """What one RL stage trains from, against what, and how it is judged."""

    policy_dir: Path  # the starting policy
    rows: list[dict]  # training prompts ("prompt" and the columns the reward reads)
    prompt_format: PromptFormat
    rewards: Rewards
    measure: Measure | None  # None outside the main process of a launch
    before: dict  # the measure's report of the starting policy
    gains: dict[str, str]  # {figure: its gain's metric name}, paired over the items
    load_reference: Callable[[], torch.nn.Module | None]  # REINFORCE's KL reference
    # Flags from the before/after figures (RLHF: reward hacking, degeneration)
    verdicts: Callable[[dict, dict, dict], dict] = field(default=lambda before, after, m: {})
    curve_prompts: int = 0  # the over-optimisation curve's prompts (0: no curve)
    curve_interval: int = 0

    def curve(self, live=None) -> HeldoutCurve | None:
        """The over-optimisation curve, measured by the main process alone; None without
        one."""
        if self.measure is None or not self.curve_interval:
            return None
        measure, first = self.measure, self.curve_prompts
        return HeldoutCurve(lambda model: measure.report(model, first), self.curve_interval, live)


def train_with_grpo(run: RlRun, p, seed: int, stage: str):
    """TRL's GRPOTrainer; returns (policy or None outside the main process, steps, seconds)."""
    started = time.perf_counter()
    policy, steps = run_grpo(
        run.policy_dir,
        run.rewards,
        run.rows,
        run.prompt_format,
        p,
        seed,
        layout.live_dir(stage),
        run.curve(),  # its curves come from the Trainer's (TrainerCurves)
    )
    return policy, steps, time.perf_counter() - started


def train_with_reinforce(run: RlRun, p, seed: int, stage: str):
    """The from-scratch REINFORCE (llmpipe.rl.reinforce); returns (policy, steps, seconds)."""
    policy = load_causal_lm(run.policy_dir)[0]
    live = curves_live(layout.live_dir(stage))
    curve = run.curve(live) or HeldoutCurve(None, 0, live)  # no curve: training figures only
    curve.measure(policy, 0)
    started = time.perf_counter()
    steps = reinforce(
        policy,
        run.load_reference() if p.beta > 0 else None,
        run.measure.tokenizer,  # the measurement's: one tokenizer, padded as REINFORCE pads
        run.rows,
        run.rewards,
        config_from(p),
        seed,
        run.prompt_format,
        log=curve.log_training,
        on_step=lambda step: curve.measure(policy, step),
    )
    wall_s = time.perf_counter() - started
    live.end()
    return policy, steps, wall_s


def finish_rl(run: RlRun, stage: str, directory: Path, policy, steps: int, p, wall_s: float):
    """Measure the trained policy, save it with its samples before and after, write the
    per-item results and the metrics, and say what changed."""
    before, after = run.before, run.measure.report(policy)
    with atomic_dir(directory) as tmp:
        policy.save_pretrained(tmp)
        run.measure.tokenizer.save_pretrained(tmp)
        write_json(tmp / "samples.json", {"before": before["samples"], "after": after["samples"]})
    write_items(layout.items_file(stage), before, after)
    metrics = {
        **level_metrics(before, "before_"),
        **level_metrics(after, "after_"),
        **gain_metrics(before, after, run.gains),
    }
    metrics.update(run.verdicts(before, after, metrics))
    metrics.update(
        steps=steps,
        heldout_items=len(after["items"]),
        completions_sampled=steps * p.prompts_per_step * p.num_generations,
        perf={"wall_s": wall_s},
    )
    write_metrics(stage, metrics)
    for figure, gain in run.gains.items():
        print(
            f"{figure} {before[figure]:.3f} -> {after[figure]:.3f}: {gain} "
            f"{metrics[gain]:+.3f}, 95% [{metrics[gain + '_lo']:+.3f}, "
            f"{metrics[gain + '_hi']:+.3f}] over {len(after['items'])} paired items"
        )
    for flag in (key for key, value in metrics.items() if key.endswith("_suspected") and value):
        print(f"warning: {flag.removesuffix('_suspected').replace('_', ' ')} suspected")
    print(f"-> {directory}")
    return metrics
