"""Talk to every model: an OpenAI-compatible server for the pipeline's models, and a page at `/`
that compares them side by side.

    python -m llmpipe.serve                       # every model `dvc repro` made, by stage name
    python -m llmpipe.serve --model mine=path/to/hf-model-dir --port 8001

It serves each model of `layout.MODEL_OUTPUTS` that exists (a new model stage appears by
itself), `lora` as the merged model or, where only the adapter is there, the adapter on its
base, and any Hugging Face model directory given with `--model name=dir`:
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (models whose tokenizer
has a chat template), streamed as server-sent events or not, and `POST /tokenize` and
`POST /detokenize` as vLLM's server has them (a prompt's ids as a completion reads it, and
back). Completions also take a list of prompts, `logprobs`, `echo` and `max_tokens: 0`, the
scoring requests of evaluation clients (`engine.choice_logprobs`; answered whole, not streamed).

Why these parts: FastAPI validates each request against a pydantic model, so a wrong type or a
missing field is a 400 naming the field without code of ours; uvicorn and sse-starlette
(EventSourceResponse) do the HTTP and the event-stream framing, and all three are maintained.
`transformers serve` and vLLM serve one model they load by hub name (vLLM on a GPU); neither
knows the pipeline's model list, its int8 model (`llmpipe.export.quantization`), its LoRA adapter on
its base, its reward model and gold scorer, or runs GPT-2 from the pipeline on a laptop CPU.

Generation is transformers' `model.generate`, not a decoding loop of ours, in one worker thread
that batches: concurrent requests to one model are generated together, each with its own
max_tokens, temperature, top-p, top-k, stop strings and seed (`llmpipe.serve.batching`). Two
generations at once would share the same cores and each go slower; a batch shares one forward
pass. At most `--max-waiting` sequences (a request's choices) wait for the worker; a request
that would pass it is answered 503 with Retry-After at once. Scoring for the page runs in the
same worker, in its turn.

Seeds: choice i of a prompt draws from a random generator of its own, seeded `seed` + i, by the
inverse of its cumulative distribution after temperature, top-k (0: no cut) and top-p
(transformers' warpers), so a seeded request draws the same tokens again, alone or batched with
any others, and its choice i equals choice 0 of the same request seeded `seed` + i; each
prompt of a list of prompts draws what it draws alone. It is not what `torch.manual_seed(s)`
then `model.generate(do_sample=True)` draws (transformers samples with torch.multinomial from
the process's one random stream, which a batch would share). At temperature 0 a completion is
`model.generate(p, do_sample=False)`'s greedy tokens, alone or batched (tests/test_serve.py),
the model's own generation config applying to both; in a left-padded batch the arithmetic
differs in its last bits, which could break a near tie between two tokens the other way. The
text is `tokenizer.decode(new_ids, skip_special_tokens=True)`, streamed or not. `stop` ends the
draw at the token that completes a stop string and cuts the text before it. Equal on one device
and machine: another CPU or a GPU may draw other tokens from the same seed. Without a seed, the
seed comes from the process's random stream.

Limits, each a 4xx with a one-line message naming the field, after which the server goes on
serving: an unknown model (404), a prompt that leaves no room in the model's context (400), a
`max_tokens` above `--max-tokens-cap` or `n` above `--max-n` (400), malformed JSON and wrong
types (400). `max_tokens` beyond the model's context is cut to what fits (finish_reason
"length"). A client that disconnects from a stream stops its generation at the next token; a
non-streamed request runs to its end (at most `--max-tokens-cap` tokens) however its client
went. Usage counts every generated token, the end-of-text included.

Prompts are the pipeline's (`llmpipe.data.chat.PromptFormat`): a completion's prompt is the
tokenizer's encoding of its text (or its token ids as given), a chat request's messages go
through the model's chat template with the pinned date of `chat.TEMPLATE_KWARGS`, as the RL
stages, their reports and evaluation render chat prompts: a served chat model reads the tokens
it was trained and evaluated on (a template that prints today's date prints that one).

Keys: with `--api-key` (or LLMPIPE_API_KEY) every route but the page itself needs the header
`Authorization: Bearer <key>`, as OpenAI's clients send it; without it, 401. The page asks for
the key once and keeps it for the browser tab's session. Without a key the server binds to
this machine only: `--host` another address stops with a one-line error unless `--insecure`
says so on purpose. The key is compared in constant time and never printed or logged.

`--engine vllm` (a GPU box with vLLM installed): every model vLLM can load is served by a vLLM
server of its own behind this one, which keeps the page, the keys and the rest
(`llmpipe.serve.vllm`).

The parts: `schema` (the requests, the errors), `engine` (the models, the jobs, the queue,
generation), `streaming` (the responses, whole or as server-sent events), `vllm` (the vLLM
servers and the forwarding to them), `page` (the comparison page) and this module (the routes
and the command).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from llmpipe.errors import DataError, LlmpipeError
from llmpipe.serve.engine import Engine, Job, Limits, build_engine, served_sources
from llmpipe.serve.page import page_html
from llmpipe.serve.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingRequest,
    ScoreRequest,
    TokenizeRequest,
    error_body,
    validation_message,
)
from llmpipe.serve.streaming import event_stream, whole_response
from llmpipe.serve.vllm import ForwardToVllm, VllmFleet, split_for_vllm

# --- the app ------------------------------------------------------------------------------


API_KEY_ENV = "LLMPIPE_API_KEY"
KEY_FREE_PATHS = ("/",)  # the page: it loads, then asks for the key


class RequireKey:
    """ASGI middleware: a request without the key gets 401 before any route runs. Plain ASGI,
    not Starlette's BaseHTTPMiddleware, which would wrap the event streams and hide a client's
    disconnect from them."""

    def __init__(self, app, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in KEY_FREE_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        error = ApiError(
            401,
            "a valid API key is needed (header Authorization: Bearer <key>)",
            kind="authentication_error",
        )
        await JSONResponse(error_body(error), status_code=401)(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None, vllm: VllmFleet | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from sse_starlette import EventSourceResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llmpipe", summary="The pipeline's models over the OpenAI API")
    app.state.engine = engine

    upstreams = vllm.models if vllm is not None else {}
    if upstreams:  # inside the key check: added first, so it wraps the routes only
        app.add_middleware(ForwardToVllm, upstreams=upstreams, key=vllm.key)
    if api_key:
        app.add_middleware(RequireKey, expected=f"Bearer {api_key}".encode())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(ApiError(400, message, param)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404 of a path, 405, ...
        return JSONResponse(
            error_body(ApiError(e.status_code, str(e.detail))), status_code=e.status_code
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return page_html()

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llmpipe",
                    # beyond OpenAI's fields, for the page (clients ignore them)
                    "context_length": served.context,
                    "chat": served.chat,
                    "source": served.source,
                }
                for name, served in engine.models.items()
            ]
            + [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "vllm",
                    "context_length": model.context,
                    "chat": model.chat,
                    "source": str(model.source),
                }
                for name, model in upstreams.items()
            ],
        }

    @app.get("/llmpipe/scorers")
    async def scorers():
        s = engine.scorers
        return {"reward_model": s.reward_model is not None, "gold": s.gold_name}

    @app.post("/llmpipe/score")
    async def score(request: ScoreRequest):
        return await engine.score(request)

    async def respond(job: Job, request: SamplingRequest, chat: bool):
        run = engine.start(job)  # queued now; 503 before any generation when the queue is full
        if not request.stream:
            return await whole_response(engine, run, chat)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        # The background task withdraws the rows of a stream that never started (a client gone
        # at once); a started stream withdraws its own.
        return EventSourceResponse(
            event_stream(engine, run, chat, include_usage),
            background=BackgroundTask(run.close),
        )

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        return engine.tokenize(request.model, request.prompt)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        return engine.detokenize(request.model, request.tokens)

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


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Another address than this machine's own needs a key, or --insecure said on purpose."""
    if api_key or insecure or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:  # a host name: it may resolve to any interface
        pass
    raise DataError(
        f"--host {host}: other machines could use this server (and its GPU) without a key; "
        f"give --api-key (or {API_KEY_ENV}), or --insecure to serve without one"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also serve this Hugging Face model directory as NAME",
    )
    parser.add_argument(
        "--no-pipeline",
        action="store_true",
        help="serve only the --model directories, not the pipeline's models",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="the repository whose data/ holds the pipeline's models",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"the key every request must bear (default: ${API_KEY_ENV}; none: no key)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="bind to another address than this machine's without a key",
    )
    parser.add_argument("--max-tokens-cap", type=int, default=Limits.max_tokens_cap)
    parser.add_argument("--max-n", type=int, default=Limits.max_n)
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=Limits.max_waiting,
        help="sequences (a request's choices) that may wait for the worker (more: 503)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=Limits.max_batch,
        help="sequences generated together in one batch",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=Limits.batch_window_ms,
        help="how long the worker waits for more sequences after the first of a batch",
    )
    parser.add_argument(
        "--stream-interval-ms",
        type=float,
        default=Limits.stream_interval_ms,
        help="a stream's text goes out at most this often (0: every token as it comes)",
    )
    parser.add_argument(
        "--no-scores", action="store_true", help="do not load the reward model and the gold scorer"
    )
    parser.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda:0")
    parser.add_argument(
        "--engine",
        choices=("llmpipe", "vllm"),
        default="llmpipe",
        help="vllm: each model vLLM can load in a vLLM server of its own, behind this one "
        "(a GPU box with vLLM installed; llmpipe.serve.vllm)",
    )
    parser.add_argument(
        "--vllm-port",
        type=int,
        default=None,
        help="--engine vllm: the first model's vLLM port on 127.0.0.1, the next +1, ... "
        "(default: --port + 1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice, every core)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let model directories run their own code (off: safetensors and "
        "the architectures transformers ships only)",
    )
    args = parser.parse_args(argv)

    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    fleet = None
    try:
        check_bind(args.host, args.api_key, args.insecure)
        extra = parse_model_args(args.model)
        if args.engine == "vllm":
            sources = served_sources(args.root, extra, not args.no_pipeline)
            on_vllm, elsewhere = split_for_vllm(sources)
            for name, why in elsewhere.items():
                print(f"{name}: served by llmpipe, not vLLM ({why})")
            fleet = VllmFleet(
                on_vllm,
                args.vllm_port or args.port + 1,
                args.root / ".llmpipe" / "vllm",
                args.trust_remote_code,
            )
            fleet.start()
        engine = build_engine(
            args.root,
            extra,
            not args.no_pipeline,
            not args.no_scores,
            Limits(
                args.max_tokens_cap,
                args.max_n,
                args.max_waiting,
                args.max_batch,
                args.batch_window_ms,
                args.stream_interval_ms,
            ),
            args.trust_remote_code,
            args.device,
            served_elsewhere=list(fleet.sources) if fleet else (),
        )
    except LlmpipeError as e:
        if fleet is not None:
            fleet.stop()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for served in engine.models.values():
        print(
            f"{served.name}: {served.source} ({served.device}, context {served.context}"
            f"{', chat' if served.chat else ''})"
        )
    s = engine.scorers
    print(
        f"scores: reward model {'yes' if s.reward_model is not None else 'no'}, "
        f"gold {s.gold_name or 'no'}"
    )
    print(f"the page: http://{args.host}:{args.port}/  the API: http://{args.host}:{args.port}/v1")
    print("API key: " + ("required (Authorization: Bearer ...)" if args.api_key else "none"))
    app = create_app(engine, args.api_key, fleet)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        if fleet is not None:
            fleet.stop()


if __name__ == "__main__":
    main()
