"""The params schema of the evaluate stage.

The rules every schema follows, and the shared keys: llmpipe.params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmpipe.params import POSITIVE_INT, POSITIVE_NUMBER, SampleParams, param


@dataclass(frozen=True, kw_only=True)
class EvaluateParams:
    SECTION: ClassVar[str] = "evaluate"
    block_size: int = param(POSITIVE_INT)
    eval_windows: int = param(POSITIVE_INT)  # per corpus, the same for every model
    batch_size: int = param(POSITIVE_INT)
    samples_per_prompt: int = param(POSITIVE_INT)  # on the held-out preference prompts
    completion_tokens: int = param(POSITIVE_INT)
    temperature: float = param(POSITIVE_NUMBER)
    generate_tokens: int = param(POSITIVE_INT)  # timed greedy generation
    repeats: int = param(POSITIVE_INT)
    sample: SampleParams  # fixed prompts whose generations go into the report
    # lm-evaluation-harness tasks run on every model (llmpipe.evaluation.harness; null: none),
    # each on at most harness_limit items (null: all)
    harness_tasks: list[str] | None
    harness_limit: int | None = param(POSITIVE_INT)
