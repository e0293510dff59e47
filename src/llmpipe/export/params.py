"""The params schema of the quantize stage.

The rules every schema follows, and the shared keys: llmpipe.params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from llmpipe.params import POSITIVE_INT, param


@dataclass(frozen=True, kw_only=True)
class QuantizeParams:
    SECTION: ClassVar[str] = "quantize"
    source: Literal["finetune", "lora"]
    method: Literal["dynamic_int8", "weight_only_int8", "static_int8"]
    block_size: int = param(POSITIVE_INT)
    eval_windows: int = param(POSITIVE_INT)
    batch_size: int = param(POSITIVE_INT)
    generate_tokens: int = param(POSITIVE_INT)  # per timed generation
    repeats: int = param(POSITIVE_INT)  # timed runs after a warm-up; the median counts
    compile: bool  # also time the compiled static-cache decoder (a C++ compiler on CPU)
    calibration_windows: int = param(POSITIVE_INT)  # static_int8: training windows
    device: Literal["auto", "cpu", "cuda"]  # where int8 and fp32 are measured

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.device == "cuda" and self.method != "weight_only_int8":
            return [
                (
                    "method",
                    f"{self.method} runs on the CPU only; with device cuda use "
                    "weight_only_int8 (torchao's kernels), or set device: cpu",
                )
            ]
        return []
