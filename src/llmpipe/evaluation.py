"""Scores every model the same way: next-token loss on a fixed set of validation windows.

Works for llmpipe's GPT and for any Hugging Face causal LM (both return logits first), so the
perplexities of pretrain, finetune, lora and later stages compare directly.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.nn import functional as F

from llmpipe.data import TokenBin


@torch.no_grad()
def window_loss(model: torch.nn.Module, bins: TokenBin, block_size: int, windows: int,
                batch_size: int, autocast=contextlib.nullcontext) -> float:
    """Mean cross-entropy (nats per token) over `windows` fixed windows of `bins`; every
    position of a window is scored (block_size predictions per window)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in bins.eval_batches(block_size, windows, batch_size):
        with autocast():
            logits = model(x.to(device))[0]
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                 reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(loss)
