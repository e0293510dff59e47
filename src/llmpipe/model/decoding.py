"""Greedy decoding of a Hugging Face causal LM with a static KV cache and a compiled step.

At the embedded default's size (4 x 128) a decoding step is a few microseconds of matmuls and
about a millisecond of overhead: `generate`'s logits processors and stopping criteria, a cache
that grows every step, and some sixty small kernels launched one by one. This decoder keeps a
transformers `StaticCache` (fixed shapes) and compiles one step (embedding -> blocks -> head ->
argmax) with `torch.compile(fullgraph=True)` into a single fused graph, so that a token costs
one graph call; the prompt is prefilled eagerly. It gives `generate`'s greedy tokens (tested)
and is how the quantize stage and bench/quantize_methods.py time fp32 and int8 decoding.
"""

from __future__ import annotations

import torch


class GreedyDecoder:
    """Greedy decoding of `batch_size` equal-length prompts (no padding), up to `max_length`
    tokens in all (prompt + new). The step compiles on the first call (seconds), once per
    decoder: build one per model and shape, and reuse it."""

    def __init__(self, model, batch_size: int, max_length: int, compile: bool = True):
        from transformers import StaticCache

        self.model = model.eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        self._step = (
            torch.compile(self._eager_step, fullgraph=True, dynamic=False)
            if compile
            else self._eager_step
        )

    def _eager_step(self, token_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """(B, 1) tokens at `position` (1,) -> (B, 1) next tokens; writes the cache in place."""
        logits = self.model(
            input_ids=token_ids,
            past_key_values=self.cache,
            cache_position=position,
            position_ids=position.unsqueeze(0),
            use_cache=True,
        ).logits
        return logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def __call__(
        self, prompt: torch.Tensor, new_tokens: int, eos_token_id: int | None = None
    ) -> torch.Tensor:
        """(B, P) prompt -> (B, new_tokens) tokens; with `eos_token_id`, a row that has produced
        it continues with it, and decoding stops early once every row has (then fewer columns
        come back)."""
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
        batch, prompt_length = prompt.shape
        if batch != self.batch_size or prompt_length + new_tokens > self.max_length:
            raise ValueError(
                f"decoder built for batch {self.batch_size} and {self.max_length} "
                f"tokens; got batch {batch}, {prompt_length} + {new_tokens} tokens"
            )
        self.cache.reset()
        prompt = prompt.to(self.device)
        logits = self.model(
            input_ids=prompt,
            past_key_values=self.cache,
            use_cache=True,
            cache_position=torch.arange(prompt_length, device=self.device),
        ).logits
        token = logits[:, -1:].argmax(-1)
        tokens = [token]
        finished = token == eos_token_id if eos_token_id is not None else None
        for position in range(prompt_length, prompt_length + new_tokens - 1):
            if finished is not None and bool(finished.all()):
                break
            token = self._step(token, torch.tensor([position], device=self.device))
            if finished is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            tokens.append(token)
        return torch.cat(tokens, dim=1)
