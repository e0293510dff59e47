"""Training curves through dvclive, as DVC plots that dvc.yaml declares.

dvclive runs here with dvcyaml=False and save_dvc_exp=False: it must neither rewrite dvc.yaml nor
save experiments of its own from inside a DVC stage. Curves use the trainer's global step as x.
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback


def curves_live(live_dir: str | Path):
    """A dvclive Live that only writes metrics and plots under `live_dir`."""
    from dvclive import Live

    class CurvesOnlyLive(Live):
        # With dvcyaml and experiment saving off, dvclive's DVC integration has nothing to do;
        # it also crashes in a git repo with no commit yet (scm.get_rev() before its own
        # no_commits check), which is where a new user runs `dvc repro` first.
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"

    return CurvesOnlyLive(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False)


# Bookkeeping the Trainer logs that makes no curve worth plotting.
_NOT_CURVES = ("runtime", "per_second", "flos", "epoch", "train_loss", "step_time", "num_tokens")


class TrainerCurves(TrainerCallback):
    """Logs what transformers' Trainer logs at its global step, and times the training steps
    alone (evaluation and checkpointing excluded) for an honest tokens/s."""

    def __init__(self, live_dir: str | Path):
        self.live_dir = live_dir
        self.live = None
        self.step_seconds = 0.0
        self._step_started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
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
            if (isinstance(value, int | float) and not isinstance(value, bool)
                    and not any(word in key for word in _NOT_CURVES)):
                name = key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}"
                self.live.log_metric(name, value)
        self.live.next_step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()
