"""The params schemas of the export stages: quantize and gguf.

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


@dataclass(frozen=True, kw_only=True)
class GgufParams:
    SECTION: ClassVar[str] = "gguf"
    # The models written as GGUF (layout.MODEL_OUTPUTS' names; lora: the merged model). The
    # quantized model is torch's int8: Q8_0 is GGUF's own.
    models: list[Literal["pretrain", "finetune", "lora", "grpo", "reinforce"]]
    file_types: list[Literal["f16", "q8_0"]]
    check_prompt: str  # the NumPy check: logits on this prompt, then greedy tokens after it
    check_tokens: int = param(POSITIVE_INT)

    def cross_field_problems(self) -> list[tuple[str, str]]:
        for key in ("models", "file_types"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                return [(key, f"{values} names one twice")]
        if not self.check_prompt:
            return [("check_prompt", "empty: the check needs at least one token")]
        return []
