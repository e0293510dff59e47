"""Serving overhead: tokens/s through llmpipe.serve against `model.generate` in this process,
time to first token, and requests/s with several concurrent clients.

    python bench/serve_throughput.py [MODEL_DIR] [--tokens 64] [--repeats 5] [--threads 1]

MODEL_DIR is any Hugging Face model directory (default: data/finetune/model, the pipeline's
finetuned model). The server runs in a subprocess (`python -m llmpipe.serve --model
bench=MODEL_DIR`) with as many torch threads as this process. Direct calls, whole responses
and streamed ones are greedy (temperature 0), where a request's tokens are `model.generate`'s,
so each contender does the same work; they alternate, `--repeats` times each, and the table
gives the best of each (timings drift on a shared machine, ratios less). Then 1, 4 and 16
clients send requests at once, all the same greedy request (the same tokens, so the same work,
whatever the server's sampler): the server batches concurrent requests
(llmpipe.serve.batching), so requests/s should rise with the clients.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

PROMPT = "The value of"
SEED = 1234


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, threads: int) -> subprocess.Popen:
    src = Path(__file__).resolve().parents[1] / "src"  # this checkout's llmpipe
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmpipe.serve",
            "--no-pipeline",
            "--no-scores",
            "--model",
            f"bench={model_dir}",
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--max-waiting",
            "64",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: the server did not start:\n{server.stderr.read()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    sys.exit("error: the server did not answer within 120 s")


def direct(model, ids: torch.Tensor, tokens: int) -> tuple[float, int]:
    """Seconds and new tokens of greedy model.generate, as a request at temperature 0."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=tokens,
            pad_token_id=model.config.eos_token_id,
        )
    return time.perf_counter() - start, out.shape[1] - ids.shape[1]


def body(tokens: int, **more) -> dict:
    return {"model": "bench", "prompt": PROMPT, "max_tokens": tokens, "seed": SEED, **more}


def whole(http: httpx.Client, tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = http.post("/v1/completions", json=body(tokens, temperature=0))
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


def streamed(http: httpx.Client, tokens: int) -> tuple[float, float, int]:
    """(seconds to the last event, seconds to the first text, tokens)."""
    start, first, used = time.perf_counter(), None, 0
    with http.stream(
        "POST",
        "/v1/completions",
        json=body(tokens, temperature=0, stream=True, stream_options={"include_usage": True}),
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, first, used


async def concurrent(url: str, clients: int, per_client: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def client() -> list[float]:
            latencies = []
            for _ in range(per_client):
                start = time.perf_counter()
                r = await http.post("/v1/completions", json=body(tokens, temperature=0))
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)
            return latencies

        start = time.perf_counter()
        latencies = [
            x for c in await asyncio.gather(*(client() for _ in range(clients))) for x in c
        ]
        wall = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "per_s": len(latencies) / wall,
        "mean": statistics.mean(latencies),
        "max": max(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=Path("data/finetune/model"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--per-client", type=int, default=2, help="requests each client sends")
    args = parser.parse_args()
    if not args.model_dir.is_dir():
        sys.exit(
            f"error: no model directory {args.model_dir} (run the pipeline up to "
            "finetune, or give a Hugging Face model directory)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, use_safetensors=True).eval()
    ids = AutoTokenizer.from_pretrained(args.model_dir)(PROMPT, return_tensors="pt").input_ids
    port = free_port()
    server = start_server(args.model_dir, port, args.threads)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            whole(http, args.tokens)
            direct(model, ids, args.tokens)  # warm both
            runs = {"direct": [], "whole": [], "streamed": [], "ttft_direct": [], "ttft": []}
            for _ in range(args.repeats):
                runs["direct"].append(direct(model, ids, args.tokens))
                runs["ttft_direct"].append(direct(model, ids, 1)[0])
                runs["whole"].append(whole(http, args.tokens))
                seconds, first, used = streamed(http, args.tokens)
                runs["streamed"].append((seconds, used))
                runs["ttft"].append(first)
        loads = {
            c: asyncio.run(concurrent(f"http://127.0.0.1:{port}", c, args.per_client, args.tokens))
            for c in args.clients
        }
    finally:
        server.terminate()
        server.wait()

    rate = {name: max(n / s for s, n in runs[name]) for name in ("direct", "whole", "streamed")}
    tokens = {name: {n for _, n in runs[name]} for name in rate}
    print(
        f"model {args.model_dir}, {args.tokens} tokens asked ({tokens['direct']} drawn), "
        f"{args.threads} torch thread(s), best of {args.repeats}\n"
    )
    print("| path | tokens/s | vs model.generate | time to first token |")
    print("|---|---:|---:|---:|")
    print(
        f"| model.generate, this process | {rate['direct']:.1f} | 1.00x | "
        f"{1000 * min(runs['ttft_direct']):.1f} ms (1 new token) |"
    )
    print(
        f"| server, whole response | {rate['whole']:.1f} | "
        f"{rate['whole'] / rate['direct']:.2f}x | |"
    )
    print(
        f"| server, streamed (SSE) | {rate['streamed']:.1f} | "
        f"{rate['streamed'] / rate['direct']:.2f}x | "
        f"{1000 * min(t for t in runs['ttft'] if t is not None):.1f} ms (first text) |"
    )
    print("\n| clients | requests | requests/s | mean latency | slowest |")
    print("|---:|---:|---:|---:|---:|")
    for clients, load in loads.items():
        print(
            f"| {clients} | {load['requests']} | {load['per_s']:.2f} | {load['mean']:.2f} s | "
            f"{load['max']:.2f} s |"
        )


if __name__ == "__main__":
    main()
