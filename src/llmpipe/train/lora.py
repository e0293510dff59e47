"""LoRA adapters with peft, for any causal LM (GPT-2's Conv1D layers included)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmpipe.errors import ParamsError

ADAPTER_CONFIG = "adapter_config.json"


def lora_config(model: torch.nn.Module, p):
    """The lora stage's adapter from its params (train.params.LoraParams: not imported, so that
    the RL stages, which build their adapters here too, do not depend on the training schema)."""
    return adapter_config(model, p.r, p.alpha, p.dropout, p.target_modules, "lora.target_modules")


ALL_LINEAR = "all-linear"  # every linear layer but the output head, whatever the architecture


def linear_layers(model: torch.nn.Module) -> list[str]:
    """The names of the model's linear layers (GPT-2's Conv1D included) but its output head:
    what `all-linear` adapts (GPT-2: c_attn, c_fc, c_proj; Llama and Qwen: q/k/v/o_proj,
    gate/up/down_proj)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | Conv1D) and module is not head
        }
    )


def adapter_config(
    model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str], key: str
):
    """A causal-LM LoraConfig whose targets are checked against the model."""
    from peft import LoraConfig, TaskType
    from transformers.pytorch_utils import Conv1D

    targets = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()}
    if list(target_modules) == [ALL_LINEAR]:
        target_modules = linear_layers(model)
    missing = [t for t in target_modules if t not in targets]
    if missing:
        linear = sorted({n for n, m in targets.items() if isinstance(m, torch.nn.Linear | Conv1D)})
        raise ParamsError(
            f"{key}: {missing} not in the base model (its linear layers: {', '.join(linear)})"
        )
    # GPT-2 stores its projections as Conv1D, weight (in, out): peft must transpose them.
    fan_in_fan_out = any(isinstance(targets[t], Conv1D) for t in target_modules)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        fan_in_fan_out=fan_in_fan_out,
        task_type=TaskType.CAUSAL_LM,
    )


def save_adapter(model, directory: Path) -> None:
    """adapter_model.safetensors + adapter_config.json. peft keeps target_modules as a set, whose
    order follows the process's string hashing: sorted here, the file is the same every run."""
    model.save_pretrained(directory)
    path = directory / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))  # as peft writes it


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())
