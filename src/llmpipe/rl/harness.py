"""What grpo and reinforce share around their algorithm: the held-out measurement (the judges,
the sampling settings and the compute dtype of rl_baseline) and the "before" figures that
rl_baseline measures once for both. A stage script reads its params and the baseline, loads
the measurement, runs its algorithm (TRL's GRPOTrainer or the from-scratch REINFORCE) and
ends with rlhf.finish_rl_stage.

Both start from the finetuned policy and are judged on the same held-out prompts with the same
sampling seed, so one measurement of the starting policy serves both: before this, each stage
measured it again (identical figures, twice the time)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from llmpipe import layout
from llmpipe.errors import DataError, ParamsError
from llmpipe.io import atomic_dir, write_json, write_metrics
from llmpipe.model.loading import load_causal_lm
from llmpipe.rl.params import RlBaselineParams
from llmpipe.rl.preferences import read_prompts
from llmpipe.rl.rlhf import REPORT_FIGURES, Judges, load_judges, policy_report
from llmpipe.rl.sampling import Sampling
from llmpipe.runtime import compute_autocast, default_device, frozen_reference

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

    def report(self, model, prompts: Sequence[str] | None = None) -> dict:
        """policy_report under the settings' autocast (the CPU's too, where REINFORCE offloads
        the reference), on the held-out prompts or the first of them."""
        dtype = self.settings.dtype
        with compute_autocast(default_device(), dtype), compute_autocast("cpu", dtype):
            return policy_report(
                model,
                self.tokenizer,
                self.prompts if prompts is None else prompts,
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
    write_metrics("rl_baseline", {key: report[key] for key in REPORT_FIGURES})
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
