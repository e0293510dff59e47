"""Dynamic batching: every generation of the server runs in one worker thread, batched.

A request becomes rows, one a choice (a prompt of a list, times `n`), each with its own prompt,
`max_tokens`, temperature, top-p, top-k, stop strings and random generator. The worker takes
the oldest row waiting, waits `batch_window_ms` for more rows of the same model (at most
`max_batch`, in order of arrival), left-pads their prompts and runs one transformers `generate`
over them. Each row samples with its own settings and generator (`RowSampling`, a logits
processor: temperature, top-k and top-p by transformers' own warpers, then one draw by the
inverse of the row's cumulative distribution; `generate` runs greedy and takes that token), ends
on its own (`RowEnd`: end-of-text, its max_tokens, a stop string, or its client gone; finished
rows get padding until the batch ends) and hands each token to its request as it comes
(`RowStreamer`). So a row draws the same tokens alone and in a batch: its draws come from its
generator only, and at temperature 0 it takes the likeliest token; what could differ is the
arithmetic of a padded batch (a near tie between two tokens, rarely).

At most `max_waiting` rows wait for the worker; a request that would pass it is refused at once
(`Busy`: a 503 with Retry-After). Other work that needs the cores (the page's scoring) runs in
the same thread between batches, in its turn.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer


class Busy(Exception):
    """The queue is full: the request is refused before any work."""


@dataclass(eq=False)
class Row:
    """One choice to generate, and where its tokens go: `emit(kind, value)` is called from the
    worker thread with ("start", None), ("tokens", None) when `tokens` has grown (once until the
    request takes them: `take_tokens`, so a request that reads slower than the worker generates
    wakes once for several tokens), then ("end", None), or ("error", exception)."""

    model: Any  # engine.ServedModel
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stops: list[str]
    generator: torch.Generator
    emit: Callable[[str, Any], None]
    job_id: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # ended by a stop string
    done: bool = False
    _told: bool = False  # a "tokens" event is on its way

    def add_token(self, token: int) -> None:
        """In the worker thread."""
        self.tokens.append(token)
        if not self._told:
            self._told = True
            self.emit("tokens", None)

    def take_tokens(self, taken: int) -> list[int]:
        """In the request's thread: the tokens after the first `taken`. The flag is cleared
        first, so a token added meanwhile is either taken now or told again."""
        self._told = False
        return self.tokens[taken:]


class RowSampling:
    """A logits processor: each row's next token drawn with the row's own settings and
    generator, left as the only possible token so that greedy `generate` takes it; a row at
    temperature 0 keeps its scores (greedy: the likeliest token)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.warpers = [
            [
                w
                for w in (
                    TemperatureLogitsWarper(r.temperature) if r.temperature > 0 else None,
                    TopKLogitsWarper(r.top_k) if r.temperature > 0 and r.top_k else None,
                    TopPLogitsWarper(r.top_p) if r.temperature > 0 and r.top_p < 1 else None,
                )
                if w is not None
            ]
            for r in rows
        ]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(self.rows):
            if row.done or row.temperature == 0:
                continue
            logits = scores[i : i + 1]
            for warper in self.warpers[i]:
                logits = warper(input_ids[i : i + 1], logits)
            cdf = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)
            u = torch.rand(
                (1, 1), generator=row.generator, dtype=torch.float64, device=row.generator.device
            ).to(cdf.device)
            # The first token whose cumulative probability exceeds u: never one of probability 0.
            token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(
                scores.size(-1) - 1
            )
            scores[i] = float("-inf")
            scores[i, token[0, 0]] = 0.0
        return scores


class RowStreamer(BaseStreamer):
    """`generate`'s streamer: each new token to its row (the first call is the prompts)."""

    def __init__(self, rows: list[Row]):
        self.rows, self.prompt_seen = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if not row.done:
                row.add_token(token)

    def end(self) -> None:
        pass


class RowEnd(StoppingCriteria):
    """Each row ends on its own: end-of-text, its max_tokens, a stop string in its text, or its
    client gone. transformers pads a finished row until every row has finished."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for row in self.rows:
            if row.done:
                continue
            eos = row.model.tokenizer.eos_token_id
            if row.stops and any(
                s in row.model.tokenizer.decode(row.tokens, skip_special_tokens=True)
                for s in row.stops
            ):
                row.stopped = True
            if (
                row.stopped
                or row.cancel.is_set()
                or (eos is not None and row.tokens and row.tokens[-1] == eos)
                or len(row.tokens) >= row.max_new_tokens
            ):
                finish(row)
        return torch.tensor([r.done for r in self.rows], device=input_ids.device)


def finish(row: Row) -> None:
    if not row.done:
        row.done = True
        row.emit("end", None)


class Batcher:
    """The worker thread and the rows waiting for it."""

    def __init__(self, max_batch: int, window_s: float, max_waiting: int):
        self.max_batch, self.window_s, self.max_waiting = max_batch, window_s, max_waiting
        self.pending: deque[Row | tuple[Callable, Future]] = deque()
        self.condition = threading.Condition()
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # for the tests and the bench
        self.started: deque[str] = deque(maxlen=1000)  # job ids, as their first row ran
        self.thread = threading.Thread(target=self._work, name="llmpipe-generate", daemon=True)
        self.thread.start()

    @property
    def waiting(self) -> int:
        with self.condition:
            return sum(isinstance(item, Row) for item in self.pending)

    def submit(self, rows: list[Row]) -> None:
        """Queue a request's rows, all or none (Busy when they would pass max_waiting)."""
        with self.condition:
            waiting = sum(isinstance(item, Row) for item in self.pending)
            if waiting + len(rows) > self.max_waiting:
                raise Busy(waiting)
            self.pending.extend(rows)
            self.condition.notify()

    def withdraw(self, rows: list[Row]) -> None:
        """A gone client's rows: those still waiting leave the queue, those running end at
        their next token."""
        with self.condition:
            for row in rows:
                row.cancel.set()
                if row in self.pending:
                    self.pending.remove(row)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn in the worker thread in its turn (work that needs the cores, as generation)."""
        future: Future = Future()
        with self.condition:
            self.pending.append((fn, future))
            self.condition.notify()
        return future

    def _take(self) -> list[Row] | tuple[Callable, Future]:
        """The next work: a call, or a batch of the oldest row's model."""
        with self.condition:
            while not self.pending:
                self.condition.wait()
            first = self.pending[0]
            if not isinstance(first, Row):
                return self.pending.popleft()
            deadline = time.monotonic() + self.window_s
            while True:
                same = [r for r in self.pending if isinstance(r, Row) and r.model is first.model]
                left = deadline - time.monotonic()
                if len(same) >= self.max_batch or left <= 0:
                    break
                self.condition.wait(left)
            batch = same[: self.max_batch]
            for row in batch:
                self.pending.remove(row)
            return batch

    def _work(self) -> None:
        while True:
            work = self._take()
            if isinstance(work, tuple):
                fn, future = work
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # the caller gets it
                        future.set_exception(e)
                continue
            rows = [r for r in work if not r.cancel.is_set()]
            for row in work:
                if row.cancel.is_set():
                    finish(row)
            if rows:
                self._generate(rows)

    def _generate(self, rows: list[Row]) -> None:
        self.batch_sizes.append(len(rows))
        for row in rows:
            if row.job_id and row.job_id not in self.started:
                self.started.append(row.job_id)
            row.emit("start", None)
        served = rows[0].model
        pad = served.pad_token_id
        pad = pad if pad is not None else 0
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left-padded: every row's next token is at the end
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        try:
            if max(r.max_new_tokens for r in rows) > 0:
                with torch.no_grad():
                    served.model.generate(
                        input_ids=ids.to(served.device),
                        attention_mask=mask.to(served.device),
                        do_sample=False,
                        max_new_tokens=max(r.max_new_tokens for r in rows),
                        logits_processor=LogitsProcessorList([RowSampling(rows)]),
                        stopping_criteria=StoppingCriteriaList([RowEnd(rows)]),
                        streamer=RowStreamer(rows),
                        pad_token_id=pad,
                    )
        except Exception as e:  # every row of the batch hears of it; the worker goes on
            for row in rows:
                if not row.done:
                    row.done = True
                    row.emit("error", e)
            return
        for row in rows:
            finish(row)  # a row of max_tokens 0, or one the batch's end cut
