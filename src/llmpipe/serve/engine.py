"""The engine: the served models and the scorers, loaded from the pipeline's model directories;
each request checked against its model and the limits and turned into a job (its prompt ids
built as the pipeline builds its prompts: `llmpipe.data.chat.PromptFormat`); and the jobs run
one at a time, in order of arrival, in a worker thread through transformers' `generate`. What a
seeded request equals, and why these parts: the docstring of `llmpipe.serve.app`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

from llmpipe import layout
from llmpipe.data.chat import PLAIN, PromptFormat
from llmpipe.errors import DataError
from llmpipe.export.quantization import RECIPE_FILE, load_for_inference
from llmpipe.model.loading import load_causal_lm, load_reward_model, load_tokenizer
from llmpipe.rl.preferences import GOLD_FILE, read_gold_spec
from llmpipe.rl.rlhf import reward_scores
from llmpipe.serve.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    ScoreRequest,
)
from llmpipe.train.lora import ADAPTER_CONFIG

# Where the model of MODEL_OUTPUTS is missing but another form of it is there: a clone that
# pulled only the LoRA adapter still serves `lora`, on its base.
FALLBACKS = {"lora": layout.LORA_ADAPTER}
# A chat request's messages become tokens as the pipeline's chat prompts do (what the RL
# stages sample and train on, what evaluation and the reports read): the tokenizer's template
# with the pinned date of chat.TEMPLATE_KWARGS, so a served chat model reads the prompt it was
# trained and evaluated with, today as on any other day.
CHAT = PromptFormat(chat=True)


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
        return getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", None
        )

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int | None:
        return (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )


def pipeline_models(root: Path) -> dict[str, Path]:
    """The pipeline's models that exist under `root`, by the name evaluate gives them."""
    found = {}
    for name, directory in layout.MODEL_OUTPUTS.items():
        for candidate in (directory, FALLBACKS.get(name)):
            if candidate is not None and (root / candidate).is_dir():
                found[name] = root / candidate
                break
    return found


def load_served_model(
    name: str,
    directory: Path,
    root: Path = Path("."),
    trust_remote_code: bool = False,
    device: str = "auto",
) -> ServedModel:
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


def _adapter_on_base(
    name: str, directory: Path, root: Path, trust_remote_code: bool, device: str
) -> ServedModel:
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
            length = len(self.prompt_format.scored_ids(self.reward_tokenizer, prompt, completion))
            if context is None or length <= context:
                reward = reward_scores(
                    self.reward_model,
                    self.reward_tokenizer,
                    self.prompt_format,
                    [prompt],
                    [completion],
                )[0]
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


# --- jobs ---------------------------------------------------------------------------------


@dataclass
class Job:
    """A validated request: what to generate, and how."""

    model: ServedModel
    prompts: list[list[int]]  # token ids; several: a completion request's list of prompts
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    n: int  # choices a prompt
    logprobs: int | None = None  # the top log-probabilities given a token; None: no logprobs
    echo: bool = False  # the prompt's tokens (and text) before the completion's
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def choices(self) -> int:
        """Choice i is prompt i // n's (i % n)-th, as OpenAI numbers a list of prompts' choices."""
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def generate_kwargs(self) -> dict:
        """model.generate's arguments besides the prompt (the module docstring's equivalence)."""
        tokenizer = self.model.tokenizer
        sampling = (
            {
                "do_sample": True,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k,
            }
            if self.temperature > 0
            else {"do_sample": False}
        )
        stops = {"stop_strings": self.stop, "tokenizer": tokenizer} if self.stop else {}
        return {
            **sampling,
            **stops,
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": self.model.pad_token_id,
        }


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
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


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
            return text[: min(hits)]
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

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
    logprobs: dict | None = None  # OpenAI's completions logprobs object (choice_logprobs)


@dataclass(frozen=True)
class Record:
    """What the server did with one request, for tests and the log: its order, and whether a
    gone client stopped it."""

    id: str
    model: str
    completion_tokens: int
    cancelled: bool


def choice_logprobs(
    served: ServedModel, prompt: list[int], completion: list[int], top: int, echo: bool
) -> dict:
    """OpenAI's completions `logprobs` of one choice, from one forward pass over its prompt and
    completion: each token's log-probability under the model's own distribution (before
    temperature, top-p or top-k, as vLLM reports it), the `top` likeliest tokens at each position
    and the chosen one beside them, and each token's offset in the text. With `echo` the prompt's
    tokens come first, the first with null (nothing predicts it). Tokens are every id drawn, the
    end-of-text included, as usage counts them."""
    tokenizer, ids = served.tokenizer, prompt + completion
    with torch.no_grad():
        logits = served.model(torch.tensor([ids], device=served.device)).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # row i: the token after position i
    first = 0 if echo else len(prompt)
    offset = 0 if echo else len(tokenizer.decode(prompt))
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for position in range(first, len(ids)):
        piece = tokenizer.decode([ids[position]])
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if position == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row = logprobs[position - 1]
        chosen = row[ids[position]].item()
        values, indices = row.topk(top)
        likeliest: dict[str, float] = {}
        for i, value in zip(indices.tolist(), values.tolist(), strict=True):
            # Two ids may decode alike (bytes of one character): the likelier keeps the key.
            likeliest.setdefault(tokenizer.decode([i]), value)
        likeliest.setdefault(piece, chosen)
        out["token_logprobs"].append(chosen)
        out["top_logprobs"].append(likeliest)
    return out


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
        if job.max_new_tokens == 0:  # scoring only (echo with logprobs)
            if streamer is not None:
                streamer.end()
            return []
        ids = torch.tensor([job.prompts[index // job.n]], device=model.device)
        # Each prompt's first choice seeds (safe: one generation at a time), so a prompt of a
        # list draws what it draws alone.
        if index % job.n == 0 and job.seed is not None:
            torch.manual_seed(job.seed)
        with torch.no_grad():
            out = model.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([Cancelled(self.cancel)]),
                **job.generate_kwargs(),
            )
        return out[0, ids.shape[1] :].tolist()

    def _finished(
        self, index: int, ids: list[int], stopped: bool, logprobs: dict | None = None
    ) -> Finished:
        self.completion_tokens += len(ids)
        eos = self.job.model.tokenizer.eos_token_id
        ended = stopped or (eos is not None and eos in ids)
        return Finished(
            index,
            "stop" if ended or len(ids) < self.job.max_new_tokens else "length",
            len(ids),
            logprobs,
        )

    def _generate_whole(self, index: int) -> tuple[list[int], dict | None]:
        """A choice's ids and, when asked for, its logprobs (one forward pass more)."""
        job = self.job
        ids = self._generate(index)
        if job.logprobs is None and not job.echo:
            return ids, None
        prompt = job.prompts[index // job.n]
        return ids, choice_logprobs(job.model, prompt, ids, job.logprobs or 0, job.echo)

    async def events(self, stream: bool) -> AsyncIterator[Delta | Finished]:
        tokenizer = self.job.model.tokenizer
        for index in range(self.job.choices):
            stop = StopText(self.job.stop)
            if stream:
                async for event in self._streamed(index, stop):
                    yield event
                continue
            try:  # anyio waits for the thread even if this task is cancelled
                ids, logprobs = await anyio.to_thread.run_sync(self._generate_whole, index)
            except Exception as e:  # reported to the client; the server goes on
                raise ApiError(500, f"generation failed: {e}", kind="server_error") from e
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if self.job.echo:
                prompt = tokenizer.decode(self.job.prompts[index // self.job.n])
                yield Delta(index, prompt)
            yield Delta(index, stop.feed(text) + stop.flush())
            yield self._finished(index, ids, stop.stopped, logprobs)
        self.completed = True

    async def _streamed(self, index: int, stop: StopText) -> AsyncIterator[Delta | Finished]:
        # transformers' streamer hands its text to this event loop through an asyncio queue.
        streamer = AsyncTextIteratorStreamer(
            self.job.model.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        result: dict = {}

        def generate():
            try:
                result["ids"] = self._generate(index, streamer)
            except Exception as e:
                result["error"] = e
                streamer.end()  # the consumer waits for the end of the stream

        self.thread = threading.Thread(target=generate, name=f"generate-{self.job.id}", daemon=True)
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

    def __init__(
        self,
        models: dict[str, ServedModel],
        scorers: Scorers | None = None,
        limits: Limits = Limits(),
    ):
        if not models:
            raise DataError(
                "no models to serve: run `dvc repro` (or its stages up to "
                "pretrain), or give --model name=directory"
            )
        self.models, self.scorers, self.limits = models, scorers or Scorers(), limits
        self.queue = GenerationQueue(limits.max_waiting)
        self.records: deque[Record] = deque(maxlen=1000)
        self.started: deque[str] = deque(maxlen=1000)  # job ids in the order they ran

    def enter(self) -> Turn:
        try:
            return self.queue.enter()
        except Busy:
            raise ApiError(
                429,
                f"server busy: {self.queue.waiting} requests are waiting "
                f"(at most {self.queue.max_waiting}); retry later",
                kind="rate_limit_error",
            ) from None

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ApiError(
                404,
                f"model: {name!r} is not served here (models: {', '.join(self.models)})",
                "model",
                "model_not_found",
            )
        return self.models[name]

    def job(
        self,
        request: SamplingRequest,
        prompts: list[list[int]],
        served: ServedModel,
        default_max_tokens: int | None,
        logprobs: int | None = None,
        echo: bool = False,
    ) -> Job:
        """Checks the request against the model and the limits."""
        limits, context = self.limits, served.context
        vocab = served.model.config.vocab_size
        for i, prompt_ids in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            if not prompt_ids:
                raise ApiError(400, f"{where}: empty (give at least one token)", "prompt")
            if context is not None and len(prompt_ids) >= context:
                raise ApiError(
                    400,
                    f"{where}: {len(prompt_ids)} tokens leave no room in the "
                    f"context of {served.name!r} ({context} tokens)",
                    "prompt",
                )
            if bad := [i for i in prompt_ids if not 0 <= i < vocab]:
                raise ApiError(
                    400,
                    f"{where}: token id {bad[0]} is outside the vocabulary of "
                    f"{served.name!r} (0..{vocab - 1})",
                    "prompt",
                )
        max_tokens = request.max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens_cap:
            raise ApiError(
                400,
                f"max_tokens: {max_tokens} is above this server's cap of "
                f"{limits.max_tokens_cap} (--max-tokens-cap)",
                "max_tokens",
            )
        n = request.n or 1
        if n > limits.max_n:
            raise ApiError(
                400, f"n: {n} is above this server's cap of {limits.max_n} (--max-n)", "n"
            )
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if "" in stop:
            raise ApiError(400, "stop: an empty string would stop at once", "stop")
        longest = max(len(p) for p in prompts)
        room = context - longest if context is not None else limits.max_tokens_cap
        # Beyond the context: cut to what fits, and finish_reason says "length".
        wanted = (
            max_tokens if max_tokens is not None else default_max_tokens or limits.max_tokens_cap
        )
        return Job(
            served,
            prompts,
            min(wanted, room, limits.max_tokens_cap),
            1.0 if request.temperature is None else request.temperature,
            1.0 if request.top_p is None else request.top_p,
            request.top_k or 0,
            stop,
            request.seed,
            n,
            logprobs,
            echo,
        )

    def tokenize(self, name: str, text: str) -> dict:
        """A prompt's ids as a completion request encodes it (PLAIN: no special tokens added)."""
        served = self.model(name)
        ids = PLAIN.prompt_ids(served.tokenizer, text)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    def detokenize(self, name: str, ids: list[int]) -> dict:
        served = self.model(name)
        vocabulary = len(served.tokenizer)
        if unknown := [i for i in ids if i >= vocabulary]:
            raise ApiError(
                400,
                f"tokens: {unknown[0]} is not a token id of {name!r} (its vocabulary has "
                f"{vocabulary})",
                "tokens",
            )
        return {"prompt": served.tokenizer.decode(ids)}

    def completion_job(self, request: CompletionRequest) -> Job:
        served = self.model(request.model)
        prompt = request.prompt
        # One prompt (a string, or token ids), or a list of them.
        several = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        prompts = [
            PLAIN.prompt_ids(served.tokenizer, p) if isinstance(p, str) else list(p)
            for p in (prompt if several else [prompt])
        ]
        if request.stream and (request.logprobs is not None or request.echo):
            raise ApiError(
                400,
                "stream: logprobs and echo are answered whole here (set stream to false)",
                "stream",
            )
        return self.job(
            request,
            prompts,
            served,
            default_max_tokens=16,  # OpenAI's default
            logprobs=request.logprobs,
            echo=request.echo,
        )

    def chat_job(self, request: ChatRequest) -> Job:
        served = self.model(request.model)
        if not served.chat:
            raise ApiError(
                400,
                f"model: {served.name!r} has no chat template (its tokenizer "
                "has none): use /v1/completions",
                "model",
            )
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:  # the template writes the special tokens it wants, the tokenizer adds none
            ids = CHAT.conversation_ids(served.tokenizer, messages)
        except Exception as e:  # the template's own checks (roles, order) raise
            raise ApiError(
                400,
                f"messages: the chat template of {served.name!r} refused them ({e})",
                "messages",
            ) from e
        return self.job(request, [ids], served, default_max_tokens=None)  # to the context

    async def run(
        self, job: Job, turn: Turn, stream: bool
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
            self.records.append(
                Record(job.id, job.model.name, run.completion_tokens, cancelled=not run.completed)
            )

    async def score(self, request: ScoreRequest) -> dict[str, float | None]:
        if not self.scorers.any:
            return {"reward_model": None, "gold": None}
        turn = self.enter()  # scoring takes the same cores as generating: same queue
        try:
            await turn.wait()
            return await anyio.to_thread.run_sync(
                self.scorers.score, request.prompt, request.completion
            )
        finally:
            turn.close()


def build_engine(
    root: Path,
    extra: dict[str, Path],
    pipeline: bool = True,
    scores: bool = True,
    limits: Limits = Limits(),
    trust_remote_code: bool = False,
    device: str = "auto",
) -> Engine:
    sources = {**(pipeline_models(root) if pipeline else {}), **extra}
    models = {
        name: load_served_model(name, directory, root, trust_remote_code, device)
        for name, directory in sources.items()
    }
    return Engine(models, load_scorers(root) if scores else Scorers(), limits)
