"""Sampling completions from a causal LM: what the preference pairs, the RL stages' reports,
evaluate and REINFORCE's training steps all draw, through one call of transformers' `generate`
(`generate`, below), whose greedy loop takes the token InverseCdfSample draws. The
from-scratch GPT samples with its own loop (model.gpt), the server streams a request at a time
(serve.engine), and the compiled greedy decoder times int8 (model.decoding)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmpipe.data.chat import PLAIN, PromptFormat, left_padded


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled: `n` per prompt, reproducible from `seed` (on CPU);
    temperature 0 is greedy."""

    n: int
    max_new_tokens: int
    temperature: float
    seed: int
    top_k: int | None = None  # None: no top-k cut
    top_p: float | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    ids: list[int]  # generated token ids, up to (not including) the end of text
    stopped: bool = False  # the model generated the end of text (a choice that has a probability)


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    sampling: Sampling,
    prompt_format: PromptFormat = PLAIN,
    batch_size: int = 64,
) -> list[list[Completion]]:
    """`sampling.n` completions per prompt."""
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(sampling.seed)
    n = sampling.n
    out: list[list[Completion]] = []
    for i in range(0, len(prompts), batch_size):
        prompt_ids = [prompt_format.prompt_ids(tokenizer, q) for q in prompts[i : i + batch_size]]
        batch, generated = generate(model, tokenizer, prompt_ids, sampling)
        new = generated[:, batch["input_ids"].size(1) :].tolist()
        for row in range(0, len(new), n):
            group = []
            for ids in new[row : row + n]:
                stopped = tokenizer.eos_token_id in ids
                if stopped:
                    ids = ids[: ids.index(tokenizer.eos_token_id)]
                group.append(
                    Completion(tokenizer.decode(ids, skip_special_tokens=True), ids, stopped)
                )
            out.append(group)
    return out


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Sequence[list[int]], sampling: Sampling):
    """Left-padded prompts and `sampling.n` continuations of each (prompt and completion ids,
    rows grouped by prompt), from the model's current random state: the one sampling call.
    Temperature 0 is greedy; no top-k or top-p cut unless `sampling` sets one. Sampled tokens
    are drawn by InverseCdfSample inside `generate`'s loop."""
    device = next(model.parameters()).device
    batch = left_padded(prompt_ids, tokenizer.pad_token_id, device)
    # Each prompt's n rows side by side, as num_return_sequences would lay them out.
    rows = left_padded(
        [row for row in prompt_ids for _ in range(sampling.n)], tokenizer.pad_token_id, device
    )
    ids = model.generate(
        **rows,
        do_sample=False,
        logits_processor=sampling_processors(sampling),
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return batch, ids


def sampling_processors(sampling: Sampling):
    """What turns `generate`'s greedy step into sampling: the temperature, top-k and top-p cuts
    (transformers' own warpers, in the order its sampling applies them), then the draw."""
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if sampling.temperature == 0:
        return LogitsProcessorList()
    processors = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_k:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(sampling.top_p))
    processors.append(InverseCdfSample())
    return processors


class InverseCdfSample:
    """A logits processor that draws each row's next token from softmax(scores), by the inverse
    of its cumulative distribution and the global random state, and leaves that token alone
    possible, so that `generate`'s greedy step takes it. `generate`'s own sampling draws with
    torch.multinomial, which on a CPU costs about 10 times as much (22.4 ms against 2.0 ms for
    256 rows of 4,096 tokens: bench/README.md, "Sampling"): half of the preferences stage."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)
        u = torch.rand((scores.size(0), 1), dtype=torch.float64, device=scores.device)
        # The first token whose cumulative probability exceeds u: never one of probability 0.
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        token = token.clamp_max(scores.size(-1) - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)
