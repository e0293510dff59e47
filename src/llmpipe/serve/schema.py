"""The API's schema: the OpenAI requests as pydantic models (FastAPI validates each request
against one, so a wrong type or a missing field is a 400 naming the field), the error an
endpoint answers with, and pydantic's validation errors as that error's one-line message.
pydantic only: no model, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_LOGPROBS = 20  # top log-probabilities a token (OpenAI's completions allow 5, vLLM 20)


# --- requests -----------------------------------------------------------------------------


class ApiError(Exception):
    """An OpenAI-style error: status, one-line message, the parameter it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,  # e.g. Retry-After
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The knobs both endpoints share. Strict: "16" is no integer. Unknown fields are ignored,
    as clients send more than this server uses (user, logprobs: null, ...)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not OpenAI's; 0 or null: no cut
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingRequest):
    # A prompt (text or token ids) or a list of them: each one's choices in turn.
    prompt: str | list[int] | list[str] | list[list[int]]
    # 0 with echo: the prompt's logprobs alone, nothing generated (scoring)
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )


class ChatRequest(SamplingRequest):
    messages: Annotated[list[Message], Field(min_length=1)]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    prompt: str
    completion: str


class TokenizeRequest(BaseModel):
    """POST /tokenize, as vLLM's server takes it: a prompt's token ids as /v1/completions reads
    the prompt."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    prompt: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    tokens: list[Annotated[int, Field(ge=0)]]


FIELD_NAMES = {
    name
    for model in (
        CompletionRequest,
        ChatRequest,
        Message,
        TextPart,
        StreamOptions,
        ScoreRequest,
        TokenizeRequest,
        DetokenizeRequest,
    )
    for name in model.model_fields
}
# What a field must be, for the one-line message when a value fits none of a union's types.
EXPECTED = {
    "prompt": "a string, a list of token ids, or a list of either",
    "stop": f"a string or a list of at most {MAX_STOP_STRINGS} strings",
    "content": "a string or a list of {type: text, text} parts",
}


# --- errors -------------------------------------------------------------------------------


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}}


def validation_message(errors: Sequence[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line naming the field: "max_tokens: Input should be a valid
    integer (got 'ten')". A value that fits none of a union's types gives one error per type,
    located by the type's name after the field's: those become what the field expects."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"request body: not valid JSON ({first.get('ctx', {}).get('error', '')})", None
    loc = [str(x) for x in first["loc"][1:]]  # after "body"
    path = []  # the field's names and list indexes, before any union member's type name
    for part in loc:
        if not (part.isdigit() or part in FIELD_NAMES):
            break
        path.append(part)
    if not path:
        return "request body: expected a JSON object", None
    name = next(part for part in reversed(path) if not part.isdigit())
    where = ".".join(path)
    got = f" (got {first['input']!r:.60})" if "input" in first else ""
    if first["type"] == "missing":
        return f"{where}: missing (required)", name
    if len(path) < len(loc) and name in EXPECTED:  # a union: no single type's message fits
        return f"{where}: expected {EXPECTED[name]}{got}", name
    return f"{where}: {first['msg']}{got}", name
