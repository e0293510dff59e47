"""The engine's events as OpenAI responses: a whole response (`whole_response`) or OpenAI's
chunks as server-sent events (`event_stream`, framed by sse-starlette's EventSourceResponse).
Both carry OpenAI's fields and a `timing` of the server's own."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from llmpipe.serve.engine import Delta, Engine, Finished, Job, Run, Started
from llmpipe.serve.schema import ApiError, error_body


def usage(job: Job, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": job.prompt_tokens + completion_tokens,
    }


def completion_choice(
    index: int,
    text: str,
    reason: str | None,
    chat: bool,
    chunk: bool = False,
    logprobs: dict | None = None,
) -> dict:
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    if chunk:
        return {
            "index": index,
            "delta": {"content": text} if text else {},
            "logprobs": None,
            "finish_reason": reason,
        }
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": reason,
    }


def response_head(job: Job, chat: bool, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}",
        "object": kind,
        "created": job.created,
        "model": job.model.name,
    }


def timing(job: Job, started: float) -> dict:
    """Beyond OpenAI's fields (clients ignore them): the seconds a request waited for the
    worker and the seconds it generated, so that tokens/s is the server's, not the network's."""
    return {
        "queued_s": round(started - job.arrived, 4),
        "generation_s": round(time.perf_counter() - started, 4),
    }


async def whole_response(engine: Engine, run: Run, chat: bool) -> dict:
    job = run.job
    texts, reasons, logprobs = [""] * job.choices, [None] * job.choices, [None] * job.choices
    tokens, started = 0, 0.0
    async for event in engine.events(run, stream=False):
        if isinstance(event, Started):
            started = time.perf_counter()
        elif isinstance(event, Delta):
            texts[event.index] += event.text
        elif isinstance(event, Finished):
            reasons[event.index] = event.reason
            logprobs[event.index] = event.logprobs
            tokens += event.completion_tokens
    return {
        **response_head(job, chat, chunk=False),
        "choices": [
            completion_choice(i, texts[i], reasons[i], chat, logprobs=logprobs[i])
            for i in range(job.choices)
        ],
        "usage": usage(job, tokens),
        "timing": timing(job, started),
    }


async def event_stream(
    engine: Engine, run: Run, chat: bool, include_usage: bool
) -> AsyncIterator[dict]:
    """OpenAI's chunks as server-sent events; sse-starlette writes the framing. The first
    chunk (the assistant role; empty text for completions) says generation has begun: until
    then the request was waiting its turn."""
    job = run.job
    head = response_head(job, chat, chunk=True)

    def chunk(choices: list[dict], **more) -> dict:
        return {"data": json.dumps({**head, "choices": choices, **more})}

    tokens, started = 0, 0.0
    try:
        async for event in engine.events(run, stream=True):
            if isinstance(event, Started):
                started = time.perf_counter()
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        if chat
                        else completion_choice(i, "", None, chat=False)
                        for i in range(job.choices)
                    ]
                )
            elif isinstance(event, Delta):
                yield chunk([completion_choice(event.index, event.text, None, chat, True)])
            else:
                tokens += event.completion_tokens
                yield chunk([completion_choice(event.index, "", event.reason, chat, True)])
        if include_usage:
            yield chunk([], usage=usage(job, tokens), timing=timing(job, started))
    except ApiError as e:  # the status line is sent: the error goes in the stream
        yield {"data": json.dumps(error_body(e))}
    yield {"data": "[DONE]"}
