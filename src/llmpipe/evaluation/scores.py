"""Scores every model the same way: next-token loss on a fixed set of validation windows.

Works for llmpipe's GPT and for any Hugging Face causal LM (both return logits first), so the
perplexities of pretrain, finetune, lora and later stages compare directly.
"""

from __future__ import annotations

import contextlib
import math
import re
import statistics
import time
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.nn import functional as F

from llmpipe.data.tokens import TokenBin
from llmpipe.evaluation.intervals import Z_95, estimate, paired_difference


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """The UTF-8 bytes of each token id's text, 0 for special tokens: end of text is no text, so
    its loss is left out of bits per byte too (as nanochat does). A byte-level BPE (GPT-2's,
    Llama-3's, the pipeline's own) writes each byte as one character, so a token's length is
    its byte count. Otherwise (SentencePiece, WordPiece) the token's text is counted: `▁` is a
    space, a byte-fallback token `<0xNN>` one byte, a `##` continuation has no space."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = type(decoder).__name__ == "ByteLevel"
    lengths = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.long)
    for token, token_id in vocab.items():
        if token_id in special:
            continue
        if byte_level:
            lengths[token_id] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            lengths[token_id] = 1
        else:
            lengths[token_id] = len(token.replace("\u2581", " ").removeprefix("##").encode())
    return lengths


@dataclass(frozen=True)
class WindowScore:
    loss: float  # mean cross-entropy, nats per token, over every prediction
    bits_per_byte: float | None  # summed loss / (UTF-8 bytes of the targets' text x ln 2)
    # Each window's mean loss (nats per token), in window order: the items of its interval
    window_losses: tuple[float, ...] = ()

    def perplexity_metrics(self, name: str = "val_perplexity") -> dict[str, float]:
        """The perplexity with its 95% interval: exp of the mean loss +- 1.96 standard errors
        of the per-window losses (windows are the items; neighbouring windows of one text are
        not quite independent, so the interval is if anything narrow)."""
        se = estimate(self.window_losses).se
        return {
            name: perplexity(self.loss),
            f"{name}_lo": perplexity(self.loss - Z_95 * se),
            f"{name}_hi": perplexity(self.loss + Z_95 * se),
        }

    def items(self) -> list[dict]:
        return [{"window": i, "loss": loss} for i, loss in enumerate(self.window_losses)]


def loss_change_metrics(before: WindowScore, after: WindowScore, name: str) -> dict[str, float]:
    """after - before of the mean loss (nats per token) on the same windows, paired over them,
    with its 95% interval: below 0 is better."""
    paired = paired_difference(before.window_losses, after.window_losses)
    change = after.loss - before.loss
    return {
        name: change,
        f"{name}_lo": change - Z_95 * paired.se,
        f"{name}_hi": change + Z_95 * paired.se,
    }


@torch.no_grad()
def window_scores(
    model: torch.nn.Module,
    bins: TokenBin,
    block_size: int,
    windows: int,
    batch_size: int,
    token_bytes: torch.Tensor | None = None,
    autocast=contextlib.nullcontext,
    sharded: bool = False,
) -> WindowScore:
    """Loss over `windows` fixed windows of `bins`, every position of a window scored
    (block_size predictions per window); with `token_bytes` (token_byte_lengths), also bits per
    byte, which does not depend on the tokenizer: models with different vocabularies compare.

    `sharded`: called by every process of a distributed run, each scores every world_size-th
    batch, and the per-batch sums are gathered and added in batch order, so the figures equal a
    single process's bit for bit (the same batches, summed in the same order)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = 0, 1
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if token_bytes is not None:
        token_bytes = token_bytes.to(device)
    # batch index -> (summed loss, targets, summed loss of text tokens, text bytes, each
    # window's mean loss)
    sums = {}
    for index, (x, y) in enumerate(bins.eval_batches(block_size, windows, batch_size)):
        if index % world != rank:
            continue
        with autocast():
            logits = model(x.to(device))[0].float().flatten(0, 1)
        targets = y.to(device).flatten()
        losses = F.cross_entropy(logits, targets, reduction="none")
        text_loss, text_bytes = 0.0, 0
        if token_bytes is not None:
            nbytes = token_bytes[targets]
            text_loss = (losses * (nbytes > 0)).sum().item()
            text_bytes = int(nbytes.sum().item())
        sums[index] = (
            F.cross_entropy(logits, targets, reduction="sum").item(),
            targets.numel(),
            text_loss,
            text_bytes,
            losses.view(len(x), -1).mean(dim=1).tolist(),
        )
    model.train(was_training)
    if world > 1:
        shards = [None] * world
        torch.distributed.all_gather_object(shards, sums)
        sums = {i: s for shard in shards for i, s in shard.items()}
    total, count, text_loss, text_bytes, window_losses = 0.0, 0, 0.0, 0, []
    for index in sorted(sums):
        batch_total, batch_count, batch_text_loss, batch_text_bytes, batch_windows = sums[index]
        total += batch_total
        count += batch_count
        text_loss += batch_text_loss
        text_bytes += batch_text_bytes
        window_losses += batch_windows
    bits_per_byte = text_loss / (math.log(2) * text_bytes) if token_bytes is not None else None
    return WindowScore(total / count, bits_per_byte, tuple(window_losses))


def window_loss(
    model: torch.nn.Module,
    bins: TokenBin,
    block_size: int,
    windows: int,
    batch_size: int,
    autocast=contextlib.nullcontext,
) -> float:
    """Mean cross-entropy (nats per token) over the fixed windows (window_scores)."""
    return window_scores(model, bins, block_size, windows, batch_size, autocast=autocast).loss


def perplexity(loss: float) -> float:
    return math.exp(loss)


def _median_seconds(fn, repeats: int) -> float:
    # GPU kernels run asynchronously: without a synchronisation the clock would time launches.
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()  # warm-up: allocation, kernel selection, lazy initialisation
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def forward_latency_s(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass over `batch` (B, T)."""
    model.eval()
    batch = batch.to(next(model.parameters()).device)
    return _median_seconds(lambda: model(batch), repeats)


@torch.no_grad()
def generation_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Greedy decoding of exactly `new_tokens` tokens (Hugging Face generate, KV cache)."""
    model.eval()
    prompt = prompt.to(next(model.parameters()).device)
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id

    def decode():
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
        )

    return new_tokens * prompt.size(0) / _median_seconds(decode, repeats)


@torch.no_grad()
def top1_agreement(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    bins: TokenBin,
    block_size: int,
    windows: int,
    batch_size: int,
) -> float:
    """Fraction of positions where both models predict the same next token."""
    model.eval()
    reference.eval()
    device, reference_device = (next(m.parameters()).device for m in (model, reference))
    same, count = 0, 0
    for x, _ in bins.eval_batches(block_size, windows, batch_size):
        predicted = model(x.to(device))[0].argmax(-1).cpu()
        expected = reference(x.to(reference_device))[0].argmax(-1).cpu()
        same += (predicted == expected).sum().item()
        count += x.numel()
    return same / count


@torch.no_grad()
def compiled_generation_tokens_per_s(
    model, prompt: torch.Tensor, new_tokens: int, repeats: int
) -> float:
    """Greedy decoding of exactly `new_tokens` tokens with the static-cache compiled decoder
    (`llmpipe.model.decoding`); the warm-up run compiles."""
    from llmpipe.model.decoding import GreedyDecoder

    decoder = GreedyDecoder(model, prompt.size(0), prompt.size(1) + new_tokens, compile=True)
    return (
        new_tokens * prompt.size(0) / _median_seconds(lambda: decoder(prompt, new_tokens), repeats)
    )


@dataclass(frozen=True)
class InferenceBench:
    """The inputs every model's inference figures are measured on: fixed validation windows
    (perplexity), one batch (forward latency) and one prompt (greedy generation)."""

    val: TokenBin
    block_size: int
    windows: int
    batch_size: int
    new_tokens: int  # per timed generation
    repeats: int  # timed runs after a warm-up; the median counts
    compiled: bool  # also time the compiled static-cache decoder
    token_bytes: torch.Tensor  # token_byte_lengths of the models' tokenizer (bits per byte)
    prompt_tokens: int = 16

    @cached_property
    def batch(self) -> torch.Tensor:
        """(batch_size, block_size): the first validation windows."""
        return next(self.val.eval_batches(self.block_size, self.batch_size, self.batch_size))[0]

    @property
    def prompt(self) -> torch.Tensor:
        return self.batch[:1, : self.prompt_tokens]


def inference_figures(model, bench: InferenceBench) -> dict:
    """Validation perplexity and bits per byte, forward latency (ms) and generation tokens/s of
    one model
    (`generate`, eager; with `bench.compiled`, also the compiled static-cache decoder)."""
    score = window_scores(
        model, bench.val, bench.block_size, bench.windows, bench.batch_size, bench.token_bytes
    )
    figures = {
        **score.perplexity_metrics(),
        "val_bits_per_byte": score.bits_per_byte,
        "score": score,  # its windows, for a paired comparison
        "forward_ms": 1e3 * forward_latency_s(model, bench.batch, bench.repeats),
        "generate_tokens_per_s": generation_tokens_per_s(
            model, bench.prompt, bench.new_tokens, bench.repeats
        ),
    }
    if bench.compiled:
        figures["compiled_generate_tokens_per_s"] = compiled_generation_tokens_per_s(
            model, bench.prompt, bench.new_tokens, bench.repeats
        )
    return figures
