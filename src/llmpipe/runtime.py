"""Where the Hugging Face stages run: the device, and the TrainingArguments that every trainer
here (transformers' Trainer, TRL's RewardConfig and GRPOConfig) shares."""

from __future__ import annotations

import torch


def default_device() -> str:
    """The GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def runtime_args(seed: int, bf16: bool | None = None) -> dict:
    """Device, precision and seeding arguments. TRL's configs default bf16 on even on CPU, so it
    is always given: by default, on CUDA only."""
    cuda = torch.cuda.is_available()
    return {"bf16": cuda if bf16 is None else bf16, "use_cpu": not cuda, "seed": seed,
            "data_seed": seed, "dataloader_num_workers": 0,
            "report_to": "none"}  # curves go through TrainerCurves, which leaves dvc.yaml alone
