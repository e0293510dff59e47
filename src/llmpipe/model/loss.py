"""Cross-entropy of a linear output layer, computed chunk by chunk without the full logits.

    loss = mean over rows n with targets[n] != -100 of  logsumexp(z_n) - z_n[targets[n]],
    z = x @ weight.T

The usual path materialises the (N, V) logits, then log_softmax, then in the backward pass
their gradient: at the embedded default (N = 2048 rows, V = 4096) that is three 32 MB tensors
streamed through memory several times, a quarter of a CPU training step. Here rows go through
in chunks small enough to stay in cache; for each chunk the forward pass computes the logits,
the loss and, when a gradient is needed, d loss / d logits = (softmax - onehot) / count, and
turns it straight into the gradients of x and weight. The backward pass only scales them.
Same loss and gradients as F.cross_entropy(x @ weight.T, targets) to float rounding (tested).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Logits per chunk: on a CPU a chunk should fit in cache (256 rows x 4096 = 4 MB; 128 and 512
# rows were no faster); on a GPU it should be big enough for full-speed kernels and few launches.
CHUNK_LOGITS = {"cpu": 2**20, "cuda": 2**25}


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, compute_dtype, needs_grad):
        # x (N, C), weight (V, C), targets (N,)
        valid = targets != IGNORE_INDEX  # (N,)
        count = valid.sum()
        w = weight.to(compute_dtype)  # cast once, not per chunk
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            x_chunk = x[rows].to(compute_dtype)  # (c, C)
            valid_chunk = valid[rows]  # (c,)
            target = targets[rows].clamp(min=0).unsqueeze(1)  # (c, 1); ignored rows -> 0
            logits = (x_chunk @ w.t()).float()  # (c, V)
            target_logit = logits.gather(1, target).squeeze(1)  # (c,)
            row_max = logits.amax(dim=1, keepdim=True)  # (c, 1)
            probs = logits.sub_(row_max).exp_()  # in place: unnormalised softmax
            row_sum = probs.sum(dim=1, keepdim=True)  # (c, 1)
            logsumexp = (row_max + row_sum.log()).squeeze(1)  # (c,)
            total += ((logsumexp - target_logit) * valid_chunk).sum()
            if needs_grad:
                probs.div_(row_sum)
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                # count * d loss / d logits, (c, V): the 1/count comes after the low-precision
                # matmuls, where it cannot flush float16 values to zero
                grad_logits = probs.mul_(valid_chunk.unsqueeze(1)).to(compute_dtype)
                grad_x[rows] = grad_logits @ w  # (c, C)
                grad_w += (grad_logits.t() @ x_chunk).float()  # (V, C)
        if needs_grad:
            grad_x.div_(count)
            grad_w.div_(count)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return (
            grad_x * grad_loss,
            (grad_w * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``x @ weight.T`` (x (N, C), weight (V, C), targets (N,),
    -100 ignored). Under autocast the matmuls run in the autocast dtype and the softmax in
    fp32, as they would on the usual path."""
    device_type = x.device.type
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_LOGITS.get(device_type, 2**25) // weight.size(0))
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    )
    # Inside forward() grad mode is always off, so whether to compute gradients is decided here.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows, compute_dtype, needs_grad)
