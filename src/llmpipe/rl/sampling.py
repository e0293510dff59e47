"""Sampling completions from a causal LM: what the preference pairs, the RL stages' reports,
evaluate and REINFORCE's training steps all draw, through one call of transformers' `generate`
(`generate`, below). The from-scratch GPT samples with its own loop (model.gpt), the server
streams a request at a time (serve.engine), and the compiled greedy decoder times int8
(model.decoding)."""

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
    Temperature 0 is greedy; no top-k or top-p cut unless `sampling` sets one."""
    batch = left_padded(prompt_ids, tokenizer.pad_token_id, next(model.parameters()).device)
    how = (
        {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k or 0,
            "top_p": sampling.top_p or 1.0,
        }
        if sampling.temperature > 0
        else {"do_sample": False}
    )
    ids = model.generate(
        **batch,
        **how,
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=sampling.n,
        pad_token_id=tokenizer.pad_token_id,
    )
    return batch, ids
