"""transformers Trainer callbacks: the training curves of the Trainer stages, and the
over-optimisation curve inside GRPO. Apart from llmpipe.train.tracking because importing the
Trainer takes seconds, which the stages that train without it (or only measure) need not
spend."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from llmpipe.runtime import writes_outputs
from llmpipe.train.tracking import _NOT_CURVES, curves_live


class StepMeasure(Protocol):
    """Something measured at training steps into a curve (llmpipe.rl.harness.HeldoutCurve)."""

    live: Any

    def measure(self, model, step: int) -> None: ...


class TrainerCurves(TrainerCallback):
    """Logs what transformers' Trainer logs at its global step, and times the training steps
    alone (evaluation and checkpointing excluded) for an honest tokens/s."""

    def __init__(self, live_dir: str | Path):
        self.live_dir = live_dir
        self.live = None
        self.step_seconds = 0.0
        self._step_started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if writes_outputs():  # the main process; or each box's first, with a copy each
            self.live = curves_live(self.live_dir)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds += time.perf_counter() - self._step_started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is None or not logs:
            return
        self.live.step = state.global_step
        for key, value in logs.items():
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and not any(word in key for word in _NOT_CURVES)
            ):
                name = key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}"
                self.live.log_metric(name, value)  # a row of the curve's file, now
        # No next_step(): it rewrites dvclive's summary and report, 12 ms a call here (3.6 s of
        # task_grpo's 300 steps); end() writes them once.

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()


class OveroptimisationCurve(TrainerCallback):
    """A StepMeasure inside a Trainer (GRPO's held-out curve): the main process measures, into
    the Trainer's curves; the others wait in their next collective."""

    def __init__(self, curves: TrainerCurves, curve: StepMeasure):
        self.curves, self.curve = curves, curve

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.curve.live = self.curves.live  # None outside the main process: nothing measured
        self.curve.measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.curve.measure(model, state.global_step)
