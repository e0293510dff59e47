"""Training curves through dvclive, as DVC plots that dvc.yaml declares (Trainer stages log
through llmpipe.train.callbacks, which imports the Trainer: seconds a stage without one
does not spend).

dvclive runs here with dvcyaml=False and save_dvc_exp=False: it must neither rewrite dvc.yaml nor
save experiments of its own from inside a DVC stage. Curves use the trainer's global step as x.
"""

from __future__ import annotations

from pathlib import Path


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


def log_step(live, step: int, figures: dict[str, float], prefix: str = "train/") -> None:
    """A training loop's figures at `step` as curves (llmpipe.rl.reinforce's loop; Trainer stages
    log through TrainerCurves)."""
    live.step = step
    for key, value in figures.items():
        if not any(word in key for word in _NOT_CURVES):
            live.log_metric(f"{prefix}{key}", value)


# Bookkeeping the Trainer logs that makes no curve worth plotting.
_NOT_CURVES = ("runtime", "per_second", "flos", "epoch", "train_loss", "step_time", "num_tokens")
