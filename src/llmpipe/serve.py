"""Talk to every model: an OpenAI-compatible server for the pipeline's models, and a page at `/`
that compares them side by side.

    python -m llmpipe.serve                       # every model `dvc repro` made, by stage name
    python -m llmpipe.serve --model mine=path/to/hf-model-dir --port 8001

It serves each model of `layout.MODEL_OUTPUTS` that exists (a new model stage appears by
itself), `lora` as the merged model or, where only the adapter is there, the adapter on its
base, and any Hugging Face model directory given with `--model name=dir`:
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (models whose tokenizer
has a chat template), streamed as server-sent events or not.

Why these parts: FastAPI validates each request against a pydantic model, so a wrong type or a
missing field is a 400 naming the field without code of ours; uvicorn and sse-starlette
(EventSourceResponse) do the HTTP and the event-stream framing, and all three are maintained.
`transformers serve` and vLLM serve one model they load by hub name (vLLM on a GPU); neither
knows the pipeline's model list, its int8 model (`llmpipe.quantization`), its LoRA adapter on
its base, its reward model and gold scorer, or runs GPT-2 from the pipeline on a laptop CPU.

Generation is transformers' `model.generate` in a worker thread, streamed through its
`AsyncTextIteratorStreamer` (the asyncio form of `TextIteratorStreamer`), not a decoding loop of
ours. One generation runs at a time per process (two would share the same cores and each go
slower), in order of arrival: `GenerationQueue` is an asyncio.Lock (FIFO) with at most
`max_waiting` requests waiting; one more is answered 429 at once. Scoring for the page takes
the same queue.

Seeds: a request with `seed` s, prompt ids p (the tokenizer's encoding of the prompt, or of the
chat template applied to the messages) and `n` 1 gives the tokens of

    torch.manual_seed(s)
    model.generate(p, do_sample=True, temperature=t, top_p=top_p, top_k=top_k, max_new_tokens=m)

(temperature 0: `do_sample=False`, greedy; `top_k` 0 is no cut), the model's own generation
config applying to both. The text is `tokenizer.decode(new_ids, skip_special_tokens=True)`,
streamed or not (tests/test_serve.py checks both through the openai client). `stop` ends the
draw at the token that completes a stop string (transformers' `stop_strings`) and cuts the
text before it; the tokens drawn until then are the same. With `n` > 1 the choices are drawn
one after another after that one `torch.manual_seed(s)`, so choice i is the (i+1)-th of n
successive `generate` calls, and choice 0 is the call above. Equal on one device and machine:
another CPU or a GPU may draw other tokens from the same seed. Without a seed, the process's
random stream goes on.

Limits, each a 4xx with a one-line message naming the field, after which the server goes on
serving: an unknown model (404), a prompt that leaves no room in the model's context (400), a
`max_tokens` above `--max-tokens-cap` or `n` above `--max-n` (400), malformed JSON and wrong
types (400). `max_tokens` beyond the model's context is cut to what fits (finish_reason
"length"). A client that disconnects from a stream stops its generation at the next token; a
non-streamed request runs to its end (at most `--max-tokens-cap` tokens) however its client
went. Usage counts every generated token, the end-of-text included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

from llmpipe import layout
from llmpipe.chat import PLAIN, PromptFormat
from llmpipe.errors import DataError, LlmpipeError
from llmpipe.loading import load_causal_lm, load_reward_model, load_tokenizer
from llmpipe.lora import ADAPTER_CONFIG
from llmpipe.preferences import GOLD_FILE, read_gold_spec
from llmpipe.quantization import RECIPE_FILE, load_for_inference
from llmpipe.rlhf import reward_scores

# Where the model of MODEL_OUTPUTS is missing but another form of it is there: a clone that
# pulled only the LoRA adapter still serves `lora`, on its base.
FALLBACKS = {"lora": layout.LORA_ADAPTER}
MAX_STOP_STRINGS = 4  # as OpenAI's API


# --- the models ---------------------------------------------------------------------------

@dataclass
class ServedModel:
    name: str
    source: str  # the directory it was loaded from
    model: torch.nn.Module
    tokenizer: Any

    @property
    def context(self) -> int | None:
        """Positions the model has (GPT-2's n_positions); None where the config does not say."""
        config = self.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings",
                                                                None)

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int | None:
        return (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id)


def pipeline_models(root: Path) -> dict[str, Path]:
    """The pipeline's models that exist under `root`, by the name evaluate gives them."""
    found = {}
    for name, directory in layout.MODEL_OUTPUTS.items():
        for candidate in (directory, FALLBACKS.get(name)):
            if candidate is not None and (root / candidate).is_dir():
                found[name] = root / candidate
                break
    return found


def load_served_model(name: str, directory: Path, root: Path = Path("."),
                      trust_remote_code: bool = False, device: str = "auto") -> ServedModel:
    """A model directory of any of the pipeline's forms: int8 (quantization.json), a peft
    adapter (adapter_config.json, on the base it names) or a Hugging Face causal LM."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"model {name!r}: no directory {directory}")
    if (directory / RECIPE_FILE).exists():  # on the device its int8 method runs on
        model = load_for_inference(directory, device)
        return ServedModel(name, str(directory), model.eval(), load_tokenizer(directory))
    if (directory / ADAPTER_CONFIG).exists():
        return _adapter_on_base(name, directory, root, trust_remote_code, device)
    model, tokenizer = load_causal_lm(directory, trust_remote_code, device)
    return ServedModel(name, str(directory), model.eval(), tokenizer)


def _adapter_on_base(name: str, directory: Path, root: Path, trust_remote_code: bool,
                     device: str) -> ServedModel:
    from peft import PeftModel

    base = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise DataError(f"model {name!r}: {directory / ADAPTER_CONFIG} names no base model")
    # The pipeline records its base as a path relative to the repository (data/pretrain/model).
    base_dir = root / base if (root / base).is_dir() else Path(base)
    model, tokenizer = load_causal_lm(base_dir, trust_remote_code, device)
    model = PeftModel.from_pretrained(model, directory)
    return ServedModel(name, f"{directory} on {base_dir}", model.eval(), tokenizer)


@dataclass
class Scorers:
    """What the page shows beside each finished completion: the pipeline's reward model on
    prompt + completion and the gold scorer on the completion (as the GRPO report scores
    them). Either is None where the pipeline has not made it."""

    reward_model: torch.nn.Module | None = None
    reward_tokenizer: Any = None
    prompt_format: PromptFormat = PLAIN  # the preference set's, which the reward model read
    gold: Callable[[Sequence[str]], list[float]] | None = None
    gold_name: str | None = None

    @property
    def any(self) -> bool:
        return self.reward_model is not None or self.gold is not None

    def score(self, prompt: str, completion: str) -> dict[str, float | None]:
        """None for what the pipeline has not made, and for a text longer than the reward
        model's context (GPT-2's positions end there)."""
        reward = None
        if self.reward_model is not None:
            context = getattr(self.reward_model.config, "n_positions", None)
            length = len(self.prompt_format.scored_ids(self.reward_tokenizer, prompt,
                                                       completion))
            if context is None or length <= context:
                reward = reward_scores(self.reward_model, self.reward_tokenizer,
                                       self.prompt_format, [prompt], [completion])[0]
        gold = self.gold([completion])[0] if self.gold is not None else None
        return {"reward_model": reward, "gold": gold}


def load_scorers(root: Path) -> Scorers:
    scorers = Scorers()
    reward_dir, preferences = root / layout.REWARD_MODEL, root / layout.PREFERENCES
    if reward_dir.is_dir():
        scorers.reward_tokenizer = load_tokenizer(reward_dir)
        scorers.reward_model = load_reward_model(reward_dir, scorers.reward_tokenizer).eval()
        scorers.prompt_format = PromptFormat.read(preferences)
    if (preferences / GOLD_FILE).exists():  # the scorer preferences.gold_scorer named
        spec = read_gold_spec(preferences)
        scorers.gold, scorers.gold_name = spec.load(), spec.scorer
    return scorers


# --- requests -----------------------------------------------------------------------------

class ApiError(Exception):
    """An OpenAI-style error: status, one-line message, the parameter it is about."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


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
    prompt: str | list[int]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return (self.content if isinstance(self.content, str)
                else "".join(part.text for part in self.content))


class ChatRequest(SamplingRequest):
    messages: Annotated[list[Message], Field(min_length=1)]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    prompt: str
    completion: str


FIELD_NAMES = {name for model in (CompletionRequest, ChatRequest, Message, TextPart,
                                   StreamOptions, ScoreRequest) for name in model.model_fields}
# What a field must be, for the one-line message when a value fits none of a union's types.
EXPECTED = {"prompt": "a string or a list of token ids",
            "stop": f"a string or a list of at most {MAX_STOP_STRINGS} strings",
            "content": "a string or a list of {type: text, text} parts"}


@dataclass
class Job:
    """A validated request: what to generate, and how."""

    model: ServedModel
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    n: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)

    def generate_kwargs(self) -> dict:
        """model.generate's arguments besides the prompt (the module docstring's equivalence)."""
        tokenizer = self.model.tokenizer
        sampling = ({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                     "top_k": self.top_k} if self.temperature > 0 else {"do_sample": False})
        stops = {"stop_strings": self.stop, "tokenizer": tokenizer} if self.stop else {}
        return {**sampling, **stops, "max_new_tokens": self.max_new_tokens,
                "pad_token_id": self.model.pad_token_id}


@dataclass(frozen=True)
class Limits:
    max_tokens_cap: int = 1024
    max_n: int = 8
    max_waiting: int = 16


# --- generation ---------------------------------------------------------------------------

class Busy(Exception):
    pass


class GenerationQueue:
    """One generation at a time, in order of arrival, at most `max_waiting` waiting.
    asyncio.Lock wakes its waiters first come, first served, and a newcomer does not jump
    ahead of them."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.waiting = 0
        self._lock = asyncio.Lock()

    def enter(self) -> Turn:
        """A place in the queue, taken at once (Busy when the queue is full)."""
        if self._lock.locked() and self.waiting >= self.max_waiting:
            raise Busy
        return Turn(self)


class Turn:
    """One request's place: wait() for it, close() when done (idempotent: the response's
    clean-up and its fallback may both call it)."""

    def __init__(self, queue: GenerationQueue):
        self.queue = queue
        self.state = "waiting"
        queue.waiting += 1

    async def wait(self) -> None:
        try:
            await self.queue._lock.acquire()
        except BaseException:
            self.close()
            raise
        self.queue.waiting -= 1
        self.state = "running"

    def close(self) -> None:
        if self.state == "waiting":
            self.queue.waiting -= 1
        elif self.state == "running":
            self.queue._lock.release()
        self.state = "closed"


class Cancelled(StoppingCriteria):
    """A stopping criterion (transformers calls it after every token) that ends generation
    once the client has gone."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class StopText:
    """Cuts streamed text before the first stop string. What might be the start of a stop
    string is held back until the next piece tells."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return "" if self.stopped else text


@dataclass(frozen=True)
class Started:
    """The request's turn has come: generation begins."""


@dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str  # stop or length
    completion_tokens: int


@dataclass(frozen=True)
class Record:
    """What the server did with one request, for tests and the log: its order, and whether a
    gone client stopped it."""

    id: str
    model: str
    completion_tokens: int
    cancelled: bool


class Run:
    """One job's generations, one choice after another, in a worker thread: streamed, each
    piece of text as it comes; whole, the text decoded once at the end (no streamer and no
    wake-up of the event loop per token: that path is as fast as `generate` itself)."""

    def __init__(self, job: Job, turn: Turn):
        self.job, self.turn = job, turn
        self.cancel = threading.Event()
        self.thread: threading.Thread | None = None
        self.completion_tokens = 0
        self.completed = False  # every choice generated (else the client went, or it failed)
        self._closed = False

    async def close(self) -> None:
        """Stop generating, wait for the thread (a generation never outlives its turn), then
        let the next request in. Shielded: it runs while a cancelled stream unwinds."""
        if self._closed:
            return
        self._closed = True
        self.cancel.set()
        if self.thread is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.thread.join)
        self.turn.close()

    def _generate(self, index: int, streamer=None) -> list[int]:
        """Choice `index`'s new token ids (the end-of-text included); runs in a worker thread."""
        job, model = self.job, self.job.model
        ids = torch.tensor([job.prompt_ids], device=model.device)
        if index == 0 and job.seed is not None:  # safe: one generation at a time
            torch.manual_seed(job.seed)
        with torch.no_grad():
            out = model.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                stopping_criteria=StoppingCriteriaList([Cancelled(self.cancel)]),
                **job.generate_kwargs())
        return out[0, ids.shape[1]:].tolist()

    def _finished(self, index: int, ids: list[int], stopped: bool) -> Finished:
        self.completion_tokens += len(ids)
        eos = self.job.model.tokenizer.eos_token_id
        ended = stopped or (eos is not None and eos in ids)
        return Finished(index, "stop" if ended or len(ids) < self.job.max_new_tokens
                        else "length", len(ids))

    async def events(self, stream: bool) -> AsyncIterator[Delta | Finished]:
        for index in range(self.job.n):
            stop = StopText(self.job.stop)
            if stream:
                async for event in self._streamed(index, stop):
                    yield event
                continue
            try:  # anyio waits for the thread even if this task is cancelled
                ids = await anyio.to_thread.run_sync(self._generate, index)
            except Exception as e:  # reported to the client; the server goes on
                raise ApiError(500, f"generation failed: {e}", kind="server_error") from e
            text = self.job.model.tokenizer.decode(ids, skip_special_tokens=True)
            yield Delta(index, stop.feed(text) + stop.flush())
            yield self._finished(index, ids, stop.stopped)
        self.completed = True

    async def _streamed(self, index: int, stop: StopText) -> AsyncIterator[Delta | Finished]:
        # transformers' streamer hands its text to this event loop through an asyncio queue.
        streamer = AsyncTextIteratorStreamer(self.job.model.tokenizer, skip_prompt=True,
                                             skip_special_tokens=True)
        result: dict = {}

        def generate():
            try:
                result["ids"] = self._generate(index, streamer)
            except Exception as e:
                result["error"] = e
                streamer.end()  # the consumer waits for the end of the stream

        self.thread = threading.Thread(target=generate, name=f"generate-{self.job.id}",
                                       daemon=True)
        self.thread.start()
        async for piece in streamer:
            if text := stop.feed(piece):
                yield Delta(index, text)
            if stop.stopped:  # the stop string is in: no need for more tokens
                self.cancel.set()
        await anyio.to_thread.run_sync(self.thread.join)
        self.cancel.clear()
        if "error" in result:
            raise ApiError(500, f"generation failed: {result['error']}", kind="server_error")
        if text := stop.flush():
            yield Delta(index, text)
        yield self._finished(index, result["ids"], stop.stopped)


class Engine:
    """The models, the scorers, the limits and the queue: what the app serves."""

    def __init__(self, models: dict[str, ServedModel], scorers: Scorers | None = None,
                 limits: Limits = Limits()):
        if not models:
            raise DataError("no models to serve: run `dvc repro` (or its stages up to "
                            "pretrain), or give --model name=directory")
        self.models, self.scorers, self.limits = models, scorers or Scorers(), limits
        self.queue = GenerationQueue(limits.max_waiting)
        self.records: deque[Record] = deque(maxlen=1000)
        self.started: deque[str] = deque(maxlen=1000)  # job ids in the order they ran

    def enter(self) -> Turn:
        try:
            return self.queue.enter()
        except Busy:
            raise ApiError(429, f"server busy: {self.queue.waiting} requests are waiting "
                                f"(at most {self.queue.max_waiting}); retry later",
                           kind="rate_limit_error") from None

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ApiError(404, f"model: {name!r} is not served here (models: "
                                f"{', '.join(self.models)})", "model", "model_not_found")
        return self.models[name]

    def job(self, request: SamplingRequest, prompt_ids: list[int], served: ServedModel,
            default_max_tokens: int | None) -> Job:
        """Checks the request against the model and the limits."""
        limits, context = self.limits, served.context
        if not prompt_ids:
            raise ApiError(400, "prompt: empty (give at least one token)", "prompt")
        if context is not None and len(prompt_ids) >= context:
            raise ApiError(400, f"prompt: {len(prompt_ids)} tokens leave no room in the "
                                f"context of {served.name!r} ({context} tokens)", "prompt")
        vocab = served.model.config.vocab_size
        if bad := [i for i in prompt_ids if not 0 <= i < vocab]:
            raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary of "
                                f"{served.name!r} (0..{vocab - 1})", "prompt")
        max_tokens = request.max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens_cap:
            raise ApiError(400, f"max_tokens: {max_tokens} is above this server's cap of "
                                f"{limits.max_tokens_cap} (--max-tokens-cap)", "max_tokens")
        n = request.n or 1
        if n > limits.max_n:
            raise ApiError(400, f"n: {n} is above this server's cap of {limits.max_n} "
                                "(--max-n)", "n")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if "" in stop:
            raise ApiError(400, "stop: an empty string would stop at once", "stop")
        room = context - len(prompt_ids) if context is not None else limits.max_tokens_cap
        # Beyond the context: cut to what fits, and finish_reason says "length".
        wanted = max_tokens or default_max_tokens or limits.max_tokens_cap
        return Job(served, prompt_ids, min(wanted, room, limits.max_tokens_cap),
                   1.0 if request.temperature is None else request.temperature,
                   1.0 if request.top_p is None else request.top_p, request.top_k or 0, stop,
                   request.seed, n)

    def completion_job(self, request: CompletionRequest) -> Job:
        served = self.model(request.model)
        prompt = request.prompt
        ids = (served.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt))
        return self.job(request, ids, served, default_max_tokens=16)  # OpenAI's default

    def chat_job(self, request: ChatRequest) -> Job:
        served = self.model(request.model)
        if not served.chat:
            raise ApiError(400, f"model: {served.name!r} has no chat template (its tokenizer "
                                "has none): use /v1/completions", "model")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=False)
        except Exception as e:  # the template's own checks (roles, order) raise
            raise ApiError(400, f"messages: the chat template of {served.name!r} refused "
                                f"them ({e})", "messages") from e
        # The template writes the special tokens it wants; the tokenizer must not add more.
        ids = served.tokenizer(text, add_special_tokens=False).input_ids
        return self.job(request, ids, served, default_max_tokens=None)  # to the context

    async def run(self, job: Job, turn: Turn, stream: bool
                  ) -> AsyncIterator[Started | Delta | Finished]:
        """Waits for the turn, then generates; the turn is released however this ends."""
        run = Run(job, turn)
        try:
            await turn.wait()
            self.started.append(job.id)
            yield Started()
            async for event in run.events(stream):
                yield event
        finally:
            with anyio.CancelScope(shield=True):
                await run.close()
            self.records.append(Record(job.id, job.model.name, run.completion_tokens,
                                       cancelled=not run.completed))

    async def score(self, request: ScoreRequest) -> dict[str, float | None]:
        if not self.scorers.any:
            return {"reward_model": None, "gold": None}
        turn = self.enter()  # scoring takes the same cores as generating: same queue
        try:
            await turn.wait()
            return await anyio.to_thread.run_sync(self.scorers.score, request.prompt,
                                                  request.completion)
        finally:
            turn.close()


# --- responses ----------------------------------------------------------------------------

def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt_ids) + completion_tokens}


def completion_choice(index: int, text: str, reason: str | None, chat: bool,
                      chunk: bool = False) -> dict:
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    if chunk:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": reason}
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": reason}


def response_head(job: Job, chat: bool, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", "object": kind,
            "created": job.created, "model": job.model.name}


def timing(job: Job, started: float) -> dict:
    """Beyond OpenAI's fields (clients ignore them): the seconds a request waited for the
    worker and the seconds it generated, so that tokens/s is the server's, not the network's."""
    return {"queued_s": round(started - job.arrived, 4),
            "generation_s": round(time.perf_counter() - started, 4)}


async def whole_response(engine: Engine, job: Job, turn: Turn, chat: bool) -> dict:
    texts, reasons = [""] * job.n, [None] * job.n
    tokens, started = 0, 0.0
    async for event in engine.run(job, turn, stream=False):
        if isinstance(event, Started):
            started = time.perf_counter()
        elif isinstance(event, Delta):
            texts[event.index] += event.text
        elif isinstance(event, Finished):
            reasons[event.index] = event.reason
            tokens += event.completion_tokens
    return {**response_head(job, chat, chunk=False),
            "choices": [completion_choice(i, texts[i], reasons[i], chat) for i in range(job.n)],
            "usage": usage(job, tokens), "timing": timing(job, started)}


async def event_stream(engine: Engine, job: Job, turn: Turn, chat: bool,
                       include_usage: bool) -> AsyncIterator[dict]:
    """OpenAI's chunks as server-sent events; sse-starlette writes the framing. The first
    chunk (the assistant role; empty text for completions) says generation has begun: until
    then the request was waiting its turn."""
    head = response_head(job, chat, chunk=True)

    def chunk(choices: list[dict], **more) -> dict:
        return {"data": json.dumps({**head, "choices": choices, **more})}

    tokens, started = 0, 0.0
    try:
        async for event in engine.run(job, turn, stream=True):
            if isinstance(event, Started):
                started = time.perf_counter()
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None} if chat
                             else completion_choice(i, "", None, chat=False)
                             for i in range(job.n)])
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


# --- the app ------------------------------------------------------------------------------

def create_app(engine: Engine):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from sse_starlette import EventSourceResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llmpipe", summary="The pipeline's models over the OpenAI API")
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(ApiError(400, message, param)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404 of a path, 405, ...
        return JSONResponse(error_body(ApiError(e.status_code, str(e.detail))),
                            status_code=e.status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("llmpipe").joinpath("serve_page.html").read_text()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "llmpipe",
             # beyond OpenAI's fields, for the page (clients ignore them)
             "context_length": served.context, "chat": served.chat, "source": served.source}
            for name, served in engine.models.items()]}

    @app.get("/llmpipe/scorers")
    async def scorers():
        s = engine.scorers
        return {"reward_model": s.reward_model is not None, "gold": s.gold_name}

    @app.post("/llmpipe/score")
    async def score(request: ScoreRequest):
        return await engine.score(request)

    async def respond(job: Job, request: SamplingRequest, chat: bool):
        turn = engine.enter()  # 429 now, before any generation, when the queue is full
        if not request.stream:
            return await whole_response(engine, job, turn, chat)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        # The background task closes a turn whose stream never started (a client gone at
        # once); a started stream closes its own.
        return EventSourceResponse(event_stream(engine, job, turn, chat, include_usage),
                                   background=BackgroundTask(turn.close))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        return await respond(engine.completion_job(request), request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        return await respond(engine.chat_job(request), request, chat=True)

    return app


# --- the command --------------------------------------------------------------------------

def parse_model_args(values: Sequence[str]) -> dict[str, Path]:
    models = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise DataError(f"--model: {value!r} is not name=directory")
        models[name] = Path(directory)
    return models


def build_engine(root: Path, extra: dict[str, Path], pipeline: bool = True, scores: bool = True,
                 limits: Limits = Limits(), trust_remote_code: bool = False,
                 device: str = "auto") -> Engine:
    sources = {**(pipeline_models(root) if pipeline else {}), **extra}
    models = {name: load_served_model(name, directory, root, trust_remote_code, device)
              for name, directory in sources.items()}
    return Engine(models, load_scorers(root) if scores else Scorers(), limits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.serve", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="also serve this Hugging Face model directory as NAME")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="serve only the --model directories, not the pipeline's models")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="the repository whose data/ holds the pipeline's models")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens-cap", type=int, default=Limits.max_tokens_cap)
    parser.add_argument("--max-n", type=int, default=Limits.max_n)
    parser.add_argument("--max-waiting", type=int, default=Limits.max_waiting,
                        help="requests that may wait for the generation worker (more: 429)")
    parser.add_argument("--no-scores", action="store_true",
                        help="do not load the reward model and the gold scorer")
    parser.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda:0")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's choice, every core)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let model directories run their own code (off: safetensors and "
                             "the architectures transformers ships only)")
    args = parser.parse_args(argv)

    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        engine = build_engine(args.root, parse_model_args(args.model), not args.no_pipeline,
                              not args.no_scores, Limits(args.max_tokens_cap, args.max_n,
                                                         args.max_waiting),
                              args.trust_remote_code, args.device)
    except LlmpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for served in engine.models.values():
        print(f"{served.name}: {served.source} ({served.device}, context {served.context}"
              f"{', chat' if served.chat else ''})")
    s = engine.scorers
    print(f"scores: reward model {'yes' if s.reward_model is not None else 'no'}, "
          f"gold {s.gold_name or 'no'}")
    print(f"the page: http://{args.host}:{args.port}/  the API: http://{args.host}:{args.port}/v1")
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
