"""`--engine vllm`: the models served by vLLM's own OpenAI server, behind llmpipe's.

On a GPU box vLLM batches continuously and pages its KV cache: far more requests per second than
`generate` one at a time. vLLM serves one model a process, so each model that vLLM can load (a
Hugging Face directory: every pipeline model but `quantized`, torch's own int8 format, and
`lora` where only its adapter is there) gets a `vllm serve` process of its own, on this machine's
loopback only, with a key of the fleet's (`secrets`, in VLLM_API_KEY), a share of the GPU's memory
(`--gpu-memory-utilization`, 0.9 split evenly) and the model's context. llmpipe's server stays
in front: the page, the keys (`--api-key`, the bind rules), /v1/models, the scorers, and the
models vLLM cannot load, which llmpipe's engine serves as without `--engine vllm`. A request
for a vLLM model goes to its process as it came (`ForwardToVllm`: the body untouched, the answer
streamed back byte for byte), so clients get vLLM's own behaviour: its sampling, its logprobs,
its errors. vLLM is an optional extra (`pip install -e '.[vllm]'` on the GPU box; it brings the
torch it is built against); without it, `--engine vllm` stops with a one-line error.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmpipe.errors import DataError
from llmpipe.train.lora import ADAPTER_CONFIG

GPU_MEMORY_SHARE = 0.9  # vLLM's own default for one model, split between the fleet's
START_TIMEOUT_S = 900  # loading, profiling and CUDA graphs of one model
PROXIED_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
NOT_FOR_VLLM = {"quantized": "torch's own int8 format, which vLLM does not read"}


@dataclass(frozen=True)
class VllmModel:
    name: str
    source: Path
    port: int
    context: int | None
    chat: bool

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def model_facts(directory: Path) -> tuple[int | None, bool]:
    """(context length, has a chat template) from the model directory's files, without loading."""
    config = json.loads((directory / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("n_positions")
    tokenizer_config = directory / "tokenizer_config.json"
    chat = (directory / "chat_template.jinja").exists() or (
        tokenizer_config.exists()
        and bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    )
    return context, chat


def split_for_vllm(sources: dict[str, Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """The models vLLM serves, and those it cannot with the reason (llmpipe serves them)."""
    on_vllm, elsewhere = {}, {}
    for name, directory in sources.items():
        if name in NOT_FOR_VLLM:
            elsewhere[name] = NOT_FOR_VLLM[name]
        elif (directory / ADAPTER_CONFIG).exists():
            elsewhere[name] = "a LoRA adapter without its merged model"
        else:
            on_vllm[name] = directory
    return on_vllm, elsewhere


def vllm_executable() -> Path:
    """vLLM's command beside this interpreter (the environment it was installed into)."""
    executable = Path(sys.executable).parent / "vllm"
    if not executable.exists():
        raise DataError(
            f"--engine vllm: vLLM is not installed in this environment (no {executable}); "
            "on a GPU box: pip install -e '.[vllm]'"
        )
    return executable


def vllm_command(
    executable: Path, model: VllmModel, gpu_share: float, trust_remote_code: bool
) -> list[str]:
    """The process's command; its key goes in VLLM_API_KEY, not on a command line that `ps`
    shows every user of the machine."""
    command = [
        str(executable),
        "serve",
        str(model.source),
        "--served-model-name",
        model.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(model.port),
        "--gpu-memory-utilization",
        f"{gpu_share:.2f}",
        "--dtype",
        "auto",
    ]
    if model.context is not None:
        command += ["--max-model-len", str(model.context)]
    if trust_remote_code:
        command.append("--trust-remote-code")
    return command


@dataclass
class VllmFleet:
    """One `vllm serve` process a model, started one after another (each profiles the GPU's free
    memory), stopped together."""

    sources: dict[str, Path]
    first_port: int
    log_dir: Path
    trust_remote_code: bool = False
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    processes: list[subprocess.Popen] = field(default_factory=list)
    models: dict[str, VllmModel] = field(init=False)  # by name: port, context, chat template

    def __post_init__(self):
        # each model directory's config read once, here
        self.models = {
            name: VllmModel(name, directory, self.first_port + i, *model_facts(directory))
            for i, (name, directory) in enumerate(self.sources.items())
        }

    def commands(self, executable: Path) -> dict[str, list[str]]:
        share = int(GPU_MEMORY_SHARE / max(1, len(self.sources)) * 100) / 100
        return {
            name: vllm_command(executable, model, share, self.trust_remote_code)
            for name, model in self.models.items()
        }

    def start(self) -> None:
        import httpx

        executable = vllm_executable()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name, command in self.commands(executable).items():
            log = self.log_dir / f"{name}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "VLLM_API_KEY": self.key},
                )
            self.processes.append(process)
            url = self.models[name].url
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                    self.stop()
                    raise DataError(
                        f"--engine vllm: vLLM stopped while loading {name!r} (exit "
                        f"{process.returncode}): {tail[0] if tail else ''} (its log: {log})"
                    )
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise DataError(
                        f"--engine vllm: {name!r} not ready after {START_TIMEOUT_S} s (log: {log})"
                    )
                time.sleep(2)
            print(f"{name}: vLLM on {url} (log {log})", flush=True)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


class ForwardToVllm:
    """ASGI middleware, inside the key check: a POST to an OpenAI route for a model vLLM serves
    goes to that model's vLLM process as it came, with the fleet's key, and its answer (whole or
    an event stream) comes back as it is made; any other request goes on to llmpipe's routes,
    its body replayed. A client that goes away closes the upstream request, and vLLM aborts it."""

    def __init__(self, app, upstreams: dict[str, VllmModel], key: str):
        import httpx

        self.app, self.upstreams, self.key = app, upstreams, key
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # the connections to vLLM close with the server
            return await self.app(scope, self._closing_at_shutdown(receive), send)
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if scope["path"] not in PROXIED_PATHS:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None
        upstream = self.upstreams.get(model) if isinstance(model, str) else None
        if upstream is None:
            return await self.app(scope, _replay(body, receive), send)
        await self._forward(upstream, scope["path"], body, send)

    def _closing_at_shutdown(self, receive):
        async def receive_and_close():
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.client.aclose()
            return message

        return receive_and_close

    async def _forward(self, upstream: VllmModel, path: str, body: bytes, send) -> None:
        import httpx

        request = self.client.build_request(
            "POST",
            upstream.url + path,
            content=body,
            headers={"content-type": "application/json", "authorization": f"Bearer {self.key}"},
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            from llmpipe.serve.schema import ApiError, error_body

            error = ApiError(502, f"model {upstream.name!r}: its vLLM server did not answer ({e})")
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 502, "headers": headers})
            payload = json.dumps(error_body(error)).encode()
            await send({"type": "http.response.body", "body": payload})
            return
        try:
            headers = [
                (k.encode(), v.encode())
                for k, v in response.headers.items()
                if k.lower() in ("content-type", "cache-control", "x-request-id")
            ]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def _replay(body: bytes, receive):
    """An ASGI receive that gives the already read body once, then waits on the real one."""
    given = False

    async def replayed():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
