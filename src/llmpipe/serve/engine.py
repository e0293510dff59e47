"""The engine: the served models and the scorers, loaded from the pipeline's model directories;
each request checked against its model and the limits and turned into a job (its prompt ids
built as the pipeline builds its prompts: `llmpipe.data.chat.PromptFormat`); and the jobs run
one at a time, in order of arrival, in a worker thread through transformers' `generate`. What a
seeded request equals, and why these parts: the docstring of `llmpipe.serve.app`."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmpipe import layout
from llmpipe.data.chat import PLAIN, PromptFormat
from llmpipe.errors import DataError
from llmpipe.export.quantization import RECIPE_FILE, load_for_inference
from llmpipe.model.loading import load_causal_lm, load_reward_model, load_tokenizer
from llmpipe.rl.preferences import GOLD_FILE, read_gold_spec
from llmpipe.rl.rlhf import reward_scores
from llmpipe.serve.batching import Batcher, Busy, Row
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


@dataclass(frozen=True)
class Limits:
    max_tokens_cap: int = 1024
    max_n: int = 8
    max_waiting: int = 64  # sequences (choices) waiting for the worker; more: 503
    max_batch: int = 16  # sequences generated together (llmpipe.serve.batching)
    batch_window_ms: float = 5.0  # how long the worker waits for more after the first
    # A stream's text goes out at most this often (its first text at once): one event for
    # the tokens of 20 ms, not one a token, halves what streaming costs (bench/README.md)
    stream_interval_ms: float = 20.0


# --- generation ---------------------------------------------------------------------------


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
    """One job's rows in the batcher (llmpipe.serve.batching), and its events: whole (each
    choice decoded once, at its end) or streamed (each choice's text as its tokens come; the
    choices one after another, generated together)."""

    def __init__(
        self,
        job: Job,
        batcher: Batcher,
        loop: asyncio.AbstractEventLoop,
        stream_interval_s: float = 0.0,
    ):
        self.job, self.batcher, self.stream_interval_s = job, batcher, stream_interval_s
        self.queues: list[asyncio.Queue] = []
        self.rows: list[Row] = []
        for index in range(job.choices):
            queue: asyncio.Queue = asyncio.Queue()
            # Choice i of a prompt draws from a generator of its own, seeded seed + i: the same
            # tokens alone and in any batch. Unseeded: a seed from the process's random stream.
            seed = (
                job.seed + index % job.n
                if job.seed is not None
                else int(torch.randint(0, 2**62, (1,)).item())
            )
            generator = torch.Generator(device=job.model.device).manual_seed(seed % 2**64)
            self.queues.append(queue)
            self.rows.append(
                Row(
                    job.model,
                    job.prompts[index // job.n],
                    job.max_new_tokens,
                    job.temperature,
                    job.top_p,
                    job.top_k,
                    job.stop,
                    generator,
                    emit=functools.partial(_emit, loop, queue),
                    job_id=job.id,
                )
            )
        self.completion_tokens = 0
        self.completed = False  # every choice generated (else the client went, or it failed)

    def close(self) -> None:
        """The client has gone or the response is done: rows still waiting leave the queue,
        running ones end at their next token. Idempotent."""
        self.batcher.withdraw([r for r in self.rows if not r.done])

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

    async def events(self, stream: bool) -> AsyncIterator[Started | Delta | Finished]:
        job, tokenizer = self.job, self.job.model.tokenizer
        started, sent_at = False, 0.0
        for index, (row, queue) in enumerate(zip(self.rows, self.queues, strict=True)):
            stop, ids, sent = StopText(job.stop), [], ""
            held = False  # tokens told of, held back until the stream interval has passed
            while True:
                wait = sent_at + self.stream_interval_s - time.perf_counter() if held else None
                try:
                    kind, value = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    kind, value = "tokens", None  # the interval has passed
                if kind == "start" and not started:
                    started = True
                    yield Started()
                elif kind == "error":  # reported to the client; the server goes on
                    raise ApiError(500, f"generation failed: {value}", kind="server_error")
                elif kind == "tokens" and stream:
                    held = time.perf_counter() < sent_at + self.stream_interval_s
                    if held:
                        continue  # sent when the interval has passed, or at the end
                    ids += row.take_tokens(len(ids))
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    if not text.endswith("\ufffd") and len(text) > len(sent):  # whole characters
                        piece, sent = text[len(sent) :], text
                        if out := stop.feed(piece):
                            sent_at = time.perf_counter()
                            yield Delta(index, out)
                elif kind == "end":
                    break
            text = tokenizer.decode(row.tokens, skip_special_tokens=True)
            if job.echo:
                yield Delta(index, tokenizer.decode(row.prompt))
            if out := stop.feed(text[len(sent) :]) + stop.flush():
                yield Delta(index, out)
            logprobs = None
            if job.logprobs is not None or job.echo:
                logprobs = await asyncio.wrap_future(
                    self.batcher.call(
                        functools.partial(
                            choice_logprobs,
                            job.model,
                            row.prompt,
                            row.tokens,
                            job.logprobs or 0,
                            job.echo,
                        )
                    )
                )
            yield self._finished(index, row.tokens, stop.stopped or row.stopped, logprobs)
        self.completed = True


def _emit(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, kind: str, value) -> None:
    """From the worker thread to the request's event loop."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
    except RuntimeError:  # the loop has closed: the server is shutting down
        pass


class Engine:
    """The models, the scorers, the limits and the queue: what the app serves."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        scorers: Scorers | None = None,
        limits: Limits = Limits(),
        others_serve: bool = False,  # --engine vllm: vLLM may serve every model
    ):
        if not models and not others_serve:
            raise DataError(
                "no models to serve: run `dvc repro` (or its stages up to "
                "pretrain), or give --model name=directory"
            )
        self.models, self.scorers, self.limits = models, scorers or Scorers(), limits
        self.batcher = Batcher(limits.max_batch, limits.batch_window_ms / 1000, limits.max_waiting)
        self.records: deque[Record] = deque(maxlen=1000)

    @property
    def started(self) -> deque[str]:
        """Job ids in the order their generation began."""
        return self.batcher.started

    def start(self, job: Job) -> Run:
        """The job's rows queued for the worker at once; 503 when they would pass max_waiting."""
        run = Run(
            job, self.batcher, asyncio.get_running_loop(), self.limits.stream_interval_ms / 1000
        )
        try:
            self.batcher.submit(run.rows)
        except Busy as busy:
            raise ApiError(
                503,
                f"server busy: {busy.args[0]} sequences are waiting (at most "
                f"{self.limits.max_waiting}, --max-waiting); retry later",
                kind="server_error",
                headers={"Retry-After": "1"},
            ) from None
        return run

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

    async def events(self, run: Run, stream: bool) -> AsyncIterator[Started | Delta | Finished]:
        """The run's events; its rows leave the batcher however this ends."""
        try:
            async for event in run.events(stream):
                yield event
        finally:
            run.close()
            job = run.job
            self.records.append(
                Record(job.id, job.model.name, run.completion_tokens, cancelled=not run.completed)
            )

    async def score(self, request: ScoreRequest) -> dict[str, float | None]:
        if not self.scorers.any:
            return {"reward_model": None, "gold": None}
        # scoring takes the same cores as generating: the same worker, in its turn
        return await asyncio.wrap_future(
            self.batcher.call(
                functools.partial(self.scorers.score, request.prompt, request.completion)
            )
        )


def build_engine(
    root: Path,
    extra: dict[str, Path],
    pipeline: bool = True,
    scores: bool = True,
    limits: Limits = Limits(),
    trust_remote_code: bool = False,
    device: str = "auto",
    served_elsewhere: Sequence[str] = (),
) -> Engine:
    """The engine of every model in `sources` (the pipeline's, and `extra`) but those
    `served_elsewhere` (by vLLM)."""
    models = {
        name: load_served_model(name, directory, root, trust_remote_code, device)
        for name, directory in served_sources(root, extra, pipeline).items()
        if name not in served_elsewhere
    }
    return Engine(
        models,
        load_scorers(root) if scores else Scorers(),
        limits,
        others_serve=bool(served_elsewhere),
    )


def served_sources(root: Path, extra: dict[str, Path], pipeline: bool = True) -> dict[str, Path]:
    """Every model to serve, by name: the pipeline's (unless `pipeline` is false), then `extra`."""
    return {**(pipeline_models(root) if pipeline else {}), **extra}
