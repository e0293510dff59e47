"""llmpipe.serve: the OpenAI API through the official client, the limits, the queue, and the
comparison page in a real browser, on micro models (random-init GPT-2 with a BPE trained on
SAMPLE_DOCS) laid out as the pipeline lays its models out."""

import asyncio
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import MICRO_CHAT_TEMPLATE, browser_path, save_micro_instruct, save_micro_model
from llmpipe import layout
from llmpipe.serve.app import check_bind, create_app, main
from llmpipe.serve.engine import Limits, StopText, build_engine, pipeline_models

torch.set_num_threads(1)  # two cores, shared: one thread for the server, none for the rest
CONTEXT = 512
LIMITS = Limits(max_tokens_cap=600, max_n=4, max_waiting=4)
PROMPT = "Return the sum of"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every model output of the pipeline (the LoRA adapter without its merged model), a reward
    model and the preferences' gold.json, as micro models."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2ForSequenceClassification

    from llmpipe.data.tokenization import load_pretrained
    from llmpipe.export.quantization import quantize, save_quantized
    from llmpipe.train.lora import save_adapter

    root = tmp_path_factory.mktemp("pipeline")
    for seed, name in enumerate(("pretrain", "finetune", "grpo", "reinforce")):
        save_micro_model(root / layout.MODEL_OUTPUTS[name], seed=seed, n_positions=CONTEXT)
    base_dir = root / layout.PRETRAIN_MODEL
    tokenizer = load_pretrained(str(base_dir))
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(
            r=2,
            target_modules=["c_attn"],
            fan_in_fan_out=True,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    save_adapter(lora, root / layout.LORA_ADAPTER)
    config_file = root / layout.LORA_ADAPTER / "adapter_config.json"
    config = json.loads(config_file.read_text())  # the base as the lora stage records it
    config_file.write_text(
        json.dumps({**config, "base_model_name_or_path": str(layout.PRETRAIN_MODEL)})
    )
    finetuned = AutoModelForCausalLM.from_pretrained(root / layout.FINETUNE_MODEL)
    save_quantized(quantize(finetuned, "dynamic_int8"), root / layout.QUANTIZED_MODEL, tokenizer)
    reward = GPT2ForSequenceClassification(
        finetuned.config.__class__(**{**finetuned.config.to_dict(), "num_labels": 1})
    )
    reward.save_pretrained(root / layout.REWARD_MODEL)
    tokenizer.save_pretrained(root / layout.REWARD_MODEL)
    (root / layout.PREFERENCES).mkdir(parents=True)
    (root / layout.PREFERENCES / "gold.json").write_text('{"scorer": "vader", "label": null}')
    save_micro_model(root / "chat", seed=3, n_positions=CONTEXT, chat_template=MICRO_CHAT_TEMPLATE)
    return root


class LiveServer:
    """uvicorn on a free port in a thread of this process, on an event loop the tests can
    reach (to hold the generation queue)."""

    def __init__(self, engine, api_key: str | None = None, vllm=None):
        import uvicorn

        self.engine = engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(engine, api_key, vllm),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
            )
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def call(self, fn):
        """Run fn() on the server's loop (what touches the queue must)."""

        async def run():
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        pending = asyncio.all_tasks(self.loop)  # sse-starlette's shutdown watcher
        for task in pending:
            task.cancel()

        async def drained():  # gathered on the server's loop, also when nothing is pending
            await asyncio.gather(*pending, return_exceptions=True)

        self.loop.run_until_complete(drained())
        self.loop.close()


@pytest.fixture(scope="module")
def server(root):
    engine = build_engine(root, {"chat": root / "chat"}, limits=LIMITS)
    live = LiveServer(engine)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def reference_generate(
    model_dir: Path, prompt_ids: list[int], seed: int, calls: int = 1, **kwargs
) -> list[list[int]]:
    """What the module docstring promises a seeded request equals: torch.manual_seed(seed), then
    `calls` successive model.generate calls; the new token ids of each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt_ids])
    torch.manual_seed(seed)
    return [
        model.generate(ids, pad_token_id=model.config.eos_token_id, **kwargs)[
            0, ids.shape[1] :
        ].tolist()
        for _ in range(calls)
    ]


def test_models_lists_every_pipeline_model_and_the_extra_one(client, root):
    names = [m.id for m in client.models.list().data]
    # layout.MODEL_OUTPUTS's order, the LoRA adapter standing in for the missing merged model
    assert names == [*layout.MODEL_OUTPUTS, "chat"]
    assert pipeline_models(root)["lora"] == root / layout.LORA_ADAPTER
    for name in names:  # each form loads and generates: HF, int8, adapter on its base
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=3, seed=0)
        assert out.model == name and out.usage.completion_tokens >= 1


SAMPLING = {"temperature": 0.9, "top_p": 0.95}


def completion_texts(client, stream: bool, **request) -> tuple[list[str], object]:
    """The choices' texts and the usage, streamed or not."""
    if not stream:
        out = client.completions.create(**request)
        return [c.text for c in out.choices], out.usage
    texts, usage = [""] * request.get("n", 1), None
    for chunk in client.completions.create(
        stream=True, stream_options={"include_usage": True}, **request
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    return texts, usage


@pytest.mark.parametrize("stream", [False, True])
def test_at_temperature_0_a_completion_is_model_generate(client, root, stream):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / layout.FINETUNE_MODEL)
    prompt_ids = tokenizer(PROMPT).input_ids
    [expected] = reference_generate(
        root / layout.FINETUNE_MODEL, prompt_ids, seed=0, do_sample=False, max_new_tokens=24
    )
    texts, usage = completion_texts(
        client, stream, model="finetune", prompt=PROMPT, max_tokens=24, temperature=0, n=2
    )
    assert texts == [tokenizer.decode(expected, skip_special_tokens=True)] * 2
    assert usage.completion_tokens == 2 * len(expected)
    assert usage.prompt_tokens == len(prompt_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_a_seeded_completion_draws_the_same_again_and_the_seed_decides(client, stream):
    request = dict(
        model="finetune",
        prompt=PROMPT,
        max_tokens=24,
        seed=7,
        n=2,
        extra_body={"top_k": 50},
        **SAMPLING,
    )
    texts, usage = completion_texts(client, stream, **request)
    assert texts == completion_texts(client, not stream, **request)[0]
    assert texts[0] != texts[1]  # choice i draws from seed + i
    assert completion_texts(client, stream, **{**request, "seed": 8, "n": 1})[0][0] == texts[1]
    assert completion_texts(client, stream, **{**request, "seed": 9, "n": 1})[0][0] != texts[0]


def test_concurrent_requests_are_batched_and_answer_as_they_do_alone(root):
    """8 requests at once, greedy and seeded, prompts of several lengths: each answer is its
    one-at-a-time answer, and the worker generated them in batches."""
    from openai import OpenAI

    limits = Limits(max_tokens_cap=600, max_waiting=16, max_batch=8, batch_window_ms=50)
    server = LiveServer(build_engine(root, {}, scores=False, limits=limits))
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        requests = [
            dict(model="finetune", prompt=f"{PROMPT} {i}" * (1 + i % 3), max_tokens=12 + i)
            | ({"temperature": 0} if i % 2 else {"seed": i, **SAMPLING})
            for i in range(8)
        ]
        alone = [client.completions.create(**r).choices[0].text for r in requests]
        assert set(server.engine.batcher.batch_sizes) == {1}
        together: dict[int, str] = {}

        def ask(i: int) -> None:
            together[i] = client.completions.create(**requests[i]).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [together.get(i) for i in range(8)] == alone
        assert max(server.engine.batcher.batch_sizes) > 1
    finally:
        server.stop()


def test_stop_strings_cut_the_text_streamed_or_not(client, root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / layout.GRPO_MODEL)
    [ids] = reference_generate(
        root / layout.GRPO_MODEL,
        tokenizer(PROMPT).input_ids,
        seed=3,
        do_sample=False,
        max_new_tokens=30,
    )
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = full[12:15]
    request = dict(model="grpo", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "@@"])
    out = client.completions.create(**request)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **request))
    assert out.choices[0].text == streamed == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert client.completions.create(**{**request, "stop": None}).choices[0].text == full


def test_chat_applies_the_template_and_a_model_without_one_is_a_400(client, root):
    from openai import BadRequestError
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tokenizer = AutoTokenizer.from_pretrained(root / "chat")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    [ids] = reference_generate(
        root / "chat",
        tokenizer(text, add_special_tokens=False).input_ids,
        seed=5,
        do_sample=False,
        max_new_tokens=12,
    )
    out = client.chat.completions.create(
        model="chat", messages=messages, temperature=0, max_tokens=12
    )
    assert out.choices[0].message.content == tokenizer.decode(ids, skip_special_tokens=True)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="chat", messages=messages, temperature=0, max_tokens=12, stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    )
    with pytest.raises(BadRequestError, match="'finetune' has no chat template"):
        client.chat.completions.create(model="finetune", messages=messages)


def test_a_chat_request_is_the_prompt_the_pipeline_evaluates_token_for_token(tmp_path):
    """An instruct template prints today's date (here the time of day) unless given one. The
    server renders a chat request as the pipeline renders its chat prompts (sampling, the RL
    reports, evaluation: PromptFormat, with the pinned date of chat.TEMPLATE_KWARGS), so a
    served chat model reads the tokens it was trained and evaluated on."""
    from fastapi.testclient import TestClient

    from llmpipe.data.chat import TEMPLATE_KWARGS, PromptFormat
    from llmpipe.model.loading import load_tokenizer
    from llmpipe.serve.schema import ChatRequest

    save_micro_instruct(tmp_path / "instruct", "llama")
    engine = build_engine(
        tmp_path, {"instruct": tmp_path / "instruct"}, pipeline=False, scores=False
    )
    tokenizer = load_tokenizer(tmp_path / "instruct")  # as the pipeline's stages load it
    pipeline = PromptFormat(chat=True)  # as sample_completions and policy_report use it

    def served(messages: list[dict]) -> list[int]:
        body = json.dumps({"model": "instruct", "messages": messages})  # as the route gets it
        return engine.chat_job(ChatRequest.model_validate_json(body)).prompts[0]

    question = [{"role": "user", "content": PROMPT}]
    expected = pipeline.prompt_ids(tokenizer, PROMPT)
    assert served(question) == expected
    assert f"Today: {TEMPLATE_KWARGS['date_string']}" in tokenizer.decode(expected)
    # A longer conversation is rendered the same way: its first two turns are the tokens the
    # reward model reads for that prompt and answer.
    answered = pipeline.scored_ids(tokenizer, PROMPT, " a list")
    more = [
        *question,
        {"role": "assistant", "content": " a list"},
        {"role": "user", "content": "and then?"},
    ]
    assert served(more)[: len(answered)] == answered
    with TestClient(create_app(engine)) as http:  # the route serves that prompt
        out = http.post(
            "/v1/chat/completions",
            json={"model": "instruct", "messages": question, "max_tokens": 1, "temperature": 0},
        )
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["prompt_tokens"] == len(expected)


LONG = list(range(1, 400)) * 2  # token ids: 798 > CONTEXT
BAD_REQUESTS = [
    (
        "/v1/completions",
        {"model": "nope", "prompt": "x"},
        404,
        "model: 'nope' is not served here (models: pretrain, finetune, lora, quantized, grpo, "
        "reinforce, chat)",
    ),
    ("/v1/completions", b'{"model": "finetune", "prompt": ', 400, "request body: not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "request body: expected a JSON object"),
    ("/v1/completions", {"prompt": "x"}, 400, "model: missing (required)"),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": "x", "max_tokens": "ten"},
        400,
        "max_tokens: Input should be a valid integer (got 'ten')",
    ),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": "x", "temperature": 3},
        400,
        "temperature: Input should be less than or equal to 2 (got 3)",
    ),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": 5},
        400,
        "prompt: expected a string, a list of token ids, or a list of either (got 5)",
    ),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": "x", "stop": ["a"] * 5},
        400,
        "stop: expected a string or a list of at most 4 strings",
    ),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": "x", "stream": "yes"},
        400,
        "stream: Input should be a valid boolean (got 'yes')",
    ),
    (
        "/v1/chat/completions",
        {"model": "chat", "messages": "hi"},
        400,
        "messages: Input should be a valid list (got 'hi')",
    ),
    (
        "/v1/chat/completions",
        {"model": "chat", "messages": [{"role": "user"}]},
        400,
        "messages.0.content: missing (required)",
    ),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": LONG},
        400,
        "prompt: 798 tokens leave no room in the context of 'finetune' (512 tokens)",
    ),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": [5, 4000]},
        400,
        "prompt: token id 4000 is outside the vocabulary of 'finetune' (0..399)",
    ),
    ("/v1/completions", {"model": "finetune", "prompt": "", "max_tokens": 2}, 400, "prompt: empty"),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": "x", "max_tokens": 10**6},
        400,
        "max_tokens: 1000000 is above this server's cap of 600 (--max-tokens-cap)",
    ),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": "x", "n": 9},
        400,
        "n: 9 is above this server's cap of 4 (--max-n)",
    ),
    (
        "/v1/completions",
        {"model": "finetune", "prompt": "x", "stop": ""},
        400,
        "stop: an empty string would stop at once",
    ),
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    BAD_REQUESTS,
    ids=[m.split(":")[0] + f"-{i}" for i, (*_, m) in enumerate(BAD_REQUESTS)],
)
def test_bad_input_is_a_clear_4xx_and_the_server_goes_on(server, path, body, status, message):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = http.post(path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"], r.json()
        ok = http.post(
            "/v1/completions", json={"model": "finetune", "prompt": "x", "max_tokens": 2}
        )
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_max_tokens_beyond_the_context_is_cut_to_what_fits(client):
    prompt = [1 + i % 300 for i in range(CONTEXT - 3)]  # token ids
    out = client.completions.create(model="finetune", prompt=prompt, max_tokens=100, temperature=0)
    assert out.usage.prompt_tokens + out.usage.completion_tokens <= CONTEXT
    assert out.choices[0].finish_reason == "length"  # greedy: no end-of-text in 3 tokens


def test_a_client_gone_mid_stream_stops_its_generation(server):
    records = len(server.engine.records)
    body = {
        "model": "pretrain",
        "prompt": PROMPT,
        "max_tokens": 500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            texts = 0
            for line in r.iter_lines():
                texts += line.startswith("data:") and '"text": ""' not in line
                if texts == 2:
                    break  # leaves the block: the connection closes mid-stream
        deadline = time.monotonic() + 10
        while len(server.engine.records) == records:
            assert time.monotonic() < deadline, "the generation did not end"
            time.sleep(0.05)
        record = server.engine.records[-1]
        assert record.cancelled and record.completion_tokens < 500
        ok = http.post(
            "/v1/completions", json={"model": "pretrain", "prompt": "x", "max_tokens": 2}
        )
        assert ok.status_code == 200


def hold_the_worker(engine) -> threading.Event:
    """The worker busy (a call that waits) until the returned event is set."""
    release, running = threading.Event(), threading.Event()

    def busy():
        running.set()
        release.wait(30)

    engine.batcher.call(busy)
    assert running.wait(10)
    return release


def test_requests_wait_in_order_of_arrival_and_a_full_queue_is_503(server):
    engine = server.engine
    release = hold_the_worker(engine)
    answers: dict[int, dict] = {}

    def ask(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            answers[i] = http.post(
                "/v1/completions", json={"model": "finetune", "prompt": PROMPT, "max_tokens": 2}
            ).json()

    threads = []
    for i in range(LIMITS.max_waiting):
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while engine.batcher.waiting < i + 1:  # arrived, in this order
            assert time.monotonic() < deadline
            time.sleep(0.02)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        busy = http.post("/v1/completions", json={"model": "finetune", "prompt": "x"})
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["message"] == (
        f"server busy: {LIMITS.max_waiting} sequences are waiting (at most "
        f"{LIMITS.max_waiting}, --max-waiting); retry later"
    )
    release.set()
    for t in threads:
        t.join(timeout=60)
    ids = [answers[i]["id"].removeprefix("cmpl-") for i in range(LIMITS.max_waiting)]
    assert list(engine.started)[-LIMITS.max_waiting :] == ids
    assert engine.batcher.waiting == 0


def test_a_client_gone_while_waiting_gives_back_its_place(server):
    engine = server.engine
    release = hold_the_worker(engine)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"model": "finetune", "prompt": PROMPT, "max_tokens": 2, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200  # the stream has begun; its generation waits
                assert engine.batcher.waiting == 1
            deadline = time.monotonic() + 10
            while engine.batcher.waiting:
                assert time.monotonic() < deadline, "the gone client still holds its place"
                time.sleep(0.02)
    finally:
        release.set()
    ok = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "finetune", "prompt": "x", "max_tokens": 2},
        timeout=30,
    )
    assert ok.status_code == 200


def test_scores_come_from_the_reward_model_and_the_gold_scorer(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/llmpipe/scorers").json() == {"reward_model": True, "gold": "vader"}
        scores = http.post("/llmpipe/score", json={"prompt": "It is", "completion": " great"})
    assert isinstance(scores.json()["reward_model"], float)
    assert scores.json()["gold"] > 0.5  # VADER: "great" is positive


def test_stop_text_holds_back_what_may_begin_a_stop_string():
    stop = StopText(["END", "\n\n"])
    assert [stop.feed(p) for p in ["abc E", "N", "x\n", "\nmore"]] == ["abc ", "", "ENx", ""]
    assert stop.stopped and stop.flush() == ""
    open_ended = StopText(["END"])
    assert open_ended.feed("abcEN") == "abc" and open_ended.flush() == "EN"


def test_the_command_says_what_is_wrong_in_one_line(capsys, tmp_path):
    for argv, message in (
        (["--model", "nodir"], "--model: 'nodir' is not name=directory"),
        (["--no-pipeline"], "no models to serve"),
        (
            ["--root", str(tmp_path), "--model", f"x={tmp_path / 'none'}"],
            f"model 'x': no directory {tmp_path / 'none'}",
        ),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_without_a_browser_ci_fails_and_a_laptop_skips(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no Chromium on PATH"):
        browser_path()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        browser_path()


def test_the_page_streams_two_models_side_by_side(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    executable = browser_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(server.url)
        expect(page.locator("#server")).to_contain_text("7 models")
        for box in page.locator("#models input").all():
            box.set_checked(box.get_attribute("value") in ("finetune", "grpo"))
        page.fill("#prompt", PROMPT)
        page.fill("#max_tokens", "200")
        # Count the text's changes in each card: a stream shows its text piece by piece.
        page.evaluate("""() => { window.updates = {};
            new MutationObserver((changes) => { for (const c of changes) {
                const card = c.target.parentElement && c.target.parentElement.closest('.card');
                if (card) window.updates[card.dataset.model] =
                    (window.updates[card.dataset.model] || 0) + 1; } })
            .observe(document.getElementById('results'),
                     {subtree: true, childList: true, characterData: true}); }""")
        page.click("#run")
        cards = page.locator(".card")
        expect(cards).to_have_count(2)
        for name in ("finetune", "grpo"):
            card = page.locator(f".card[data-model={name}]")
            expect(card.locator(".state")).to_have_text("done", timeout=30_000)
            expect(card.locator("[data-stat=gold] b")).not_to_have_text("—")
            assert card.locator(".text .caret").inner_text().strip()
            assert float(card.locator("[data-stat=tps] b").inner_text()) > 0
            assert card.locator("[data-stat=rm] b").inner_text() != "—"
        updates = page.evaluate("window.updates")
        assert updates["finetune"] > 3 and updates["grpo"] > 3, updates
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()


KEY = "sk-llmpipe-test-4f1b9c"


@pytest.fixture(scope="module")
def keyed_server(root):
    live = LiveServer(build_engine(root, {}, scores=False, limits=LIMITS), api_key=KEY)
    yield live
    live.stop()


def test_a_key_guards_every_route_but_the_page(keyed_server):
    from openai import AuthenticationError, OpenAI

    url = f"{keyed_server.url}/v1"
    for key in ("", "wrong", KEY[:-1]):
        with pytest.raises(AuthenticationError, match="a valid API key is needed"):
            OpenAI(base_url=url, api_key=key or "none", max_retries=0).models.list()
    response = httpx.post(f"{url}/completions", json={"model": "finetune", "prompt": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{keyed_server.url}/llmpipe/scorers").status_code == 401
    assert httpx.get(keyed_server.url).status_code == 200  # the page, which asks for the key
    client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert "finetune" in {m.id for m in client.models.list()}
    done = client.completions.create(model="finetune", prompt=PROMPT, max_tokens=4, seed=1)
    assert done.usage.completion_tokens >= 1


def test_another_address_than_this_machines_needs_a_key_or_insecure(capsys):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None, insecure=False)
    check_bind("0.0.0.0", "a key", insecure=False)
    check_bind("0.0.0.0", None, insecure=True)
    with pytest.raises(SystemExit) as exit_:
        main(["--host", "0.0.0.0", "--no-pipeline", "--model", "x=/nonexistent"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --host 0.0.0.0: other machines could use this server (and its GPU) without a "
        "key; give --api-key (or LLMPIPE_API_KEY), or --insecure to serve without one"
    )


@pytest.mark.slow  # the command in a process of its own, as users run it
def test_the_key_never_reaches_the_log(root, tmp_path):
    """The command run as users run it, the key from the environment: whatever requests come,
    its output never holds the key."""
    import subprocess
    import sys

    from conftest import subprocess_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "llmpipe.serve", "--root", str(root), "--no-scores"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--threads", "1"],
        env=subprocess_env(LLMPIPE_API_KEY=KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.3)
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 200
        assert (
            httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer no"}).status_code == 401
        )
        body = {"model": "finetune", "prompt": KEY, "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=headers).status_code == 200
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "API key: required" in output and '"GET /v1/models HTTP/1.1" 401' in output
    assert KEY not in output


def test_the_page_asks_for_the_key_once_a_session(keyed_server):
    from playwright.sync_api import expect, sync_playwright

    executable = browser_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page()
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(KEY)))
        page.goto(keyed_server.url)
        expect(page.locator("#models input")).not_to_have_count(0)
        page.reload()  # the same tab: the key is kept for its session
        expect(page.locator("#models input")).not_to_have_count(0)
        assert asked == ["This server needs its API key:"]
        browser.close()


def test_tokenize_and_detokenize_round_trip_as_a_completion_reads_the_prompt(server, client):
    text = "Return the sum of a and b. Ünïcödé too"
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": "finetune", "prompt": text})
    body = tokens.json()
    assert tokens.status_code == 200 and body["count"] == len(body["tokens"]) > 3
    assert body["max_model_len"] == CONTEXT
    done = client.completions.create(model="finetune", prompt=text, max_tokens=1)
    assert done.usage.prompt_tokens == body["count"]  # the ids a completion reads
    back = httpx.post(
        f"{server.url}/detokenize", json={"model": "finetune", "tokens": body["tokens"]}
    )
    assert back.json() == {"prompt": text}
    bad = httpx.post(f"{server.url}/detokenize", json={"model": "finetune", "tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert "is not a token id of 'finetune'" in bad.json()["error"]["message"]
    unknown = httpx.post(f"{server.url}/tokenize", json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404


def hf_log_likelihood(model_dir: Path, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), summed over its tokens, in-process from the HF model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(context) + i - 1, token].item() for i, token in enumerate(continuation))


def test_echoed_logprobs_are_the_models_log_likelihood_for_a_list_of_prompts(client, root):
    """The evaluation clients' scoring request (lm-eval's local-completions): token-id prompts
    in a list, echo, logprobs, nothing generated; each choice's summed logprobs over the
    continuation are its log-likelihood."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / layout.FINETUNE_MODEL)
    context = tokenizer("Question: what is two and two? Answer:").input_ids
    continuations = [tokenizer(" four").input_ids, tokenizer(" five apples").input_ids]
    out = client.completions.create(
        model="finetune",
        prompt=[context + c for c in continuations],
        echo=True,
        logprobs=2,
        max_tokens=0,
        temperature=0,
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(len(context + c) for c in continuations)
    for choice, continuation in zip(out.choices, continuations, strict=True):
        logprobs = choice.logprobs
        ids = context + continuation
        assert choice.text == tokenizer.decode(ids)  # the prompt, echoed
        assert logprobs.tokens == [tokenizer.decode([i]) for i in ids]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]
        served = sum(logprobs.token_logprobs[len(context) :])
        expected = hf_log_likelihood(root / layout.FINETUNE_MODEL, context, continuation)
        assert served == pytest.approx(expected, abs=1e-4)
        for lp, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
            assert 2 <= len(top) <= 3 and max(top.values()) >= lp  # the chosen one beside


def test_greedy_tokens_come_with_their_logprobs_and_a_prompt_list_answers_each_alone(client, root):
    out = client.completions.create(
        model="grpo", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3
    )
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == out.usage.completion_tokens
    # greedy: each token is its position's likeliest
    for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert lp == pytest.approx(max(top.values()), abs=1e-6) and 1 <= len(top) <= 3
    assert logprobs.text_offset[0] == len(PROMPT)  # offsets count from the prompt's start

    prompts = [PROMPT, "Another prompt"]
    request = dict(model="grpo", max_tokens=6, seed=5, n=2, **SAMPLING)
    together = client.completions.create(prompt=prompts, **request)
    assert [c.index for c in together.choices] == [0, 1, 2, 3]  # prompt i's: 2i, 2i + 1
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(prompt=prompt, **request)
        assert [c.text for c in together.choices[2 * i : 2 * i + 2]] == [
            c.text for c in alone.choices
        ]
        assert all(c.logprobs is None for c in alone.choices)  # not asked for


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "logprobs": 1, "stream": True}, "stream: logprobs and echo are answered"),
        ({"prompt": ["x", ""]}, "prompt.1: empty"),
        ({"prompt": "x", "logprobs": 21}, "logprobs: Input should be less than or equal to 20"),
        ({"prompt": [["x"]]}, "prompt: expected a string, a list of token ids, or a list of"),
    ],
)
def test_bad_scoring_requests_name_the_field(server, body, message):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "finetune", **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_vllm_gets_every_model_it_can_load_with_its_own_port_and_a_share_of_the_gpu(root):
    from llmpipe.serve.engine import served_sources
    from llmpipe.serve.vllm import VllmFleet, split_for_vllm

    on_vllm, elsewhere = split_for_vllm(served_sources(root, {"chat": root / "chat"}))
    assert list(on_vllm) == ["pretrain", "finetune", "grpo", "reinforce", "chat"]
    assert set(elsewhere) == {"quantized", "lora"}  # torch's int8; the adapter alone
    fleet = VllmFleet(on_vllm, 9001, root / "logs")
    commands = fleet.commands(Path("/venv/bin/vllm"))
    assert commands["finetune"] == [
        "/venv/bin/vllm",
        "serve",
        str(root / layout.FINETUNE_MODEL),
        "--served-model-name",
        "finetune",
        "--host",
        "127.0.0.1",
        "--port",
        "9002",
        "--gpu-memory-utilization",
        "0.18",  # 0.9 split five ways
        "--dtype",
        "auto",
        "--max-model-len",
        str(CONTEXT),
    ]
    assert fleet.models["chat"].chat and not fleet.models["finetune"].chat
    assert all(fleet.key not in " ".join(c) for c in commands.values())  # in VLLM_API_KEY


def test_without_vllm_the_engine_option_is_a_one_line_error(capsys, root):
    with pytest.raises(SystemExit) as exit_:
        main(["--root", str(root), "--engine", "vllm", "--no-scores"])
    assert exit_.value.code == 2
    assert "error: --engine vllm: vLLM is not installed in this environment" in (
        capsys.readouterr().err
    )


def test_the_connections_to_vllm_close_with_the_server():
    """The forwarding middleware's client lives as long as the server: the ASGI lifespan's
    shutdown closes it, and the app still sees the lifespan messages."""
    import asyncio

    from llmpipe.serve.vllm import ForwardToVllm

    seen = []

    async def app(scope, receive, send):  # a server's lifespan: startup, then shutdown
        for step in ("startup", "shutdown"):
            seen.append((await receive())["type"])
            await send({"type": f"lifespan.{step}.complete"})

    forwarding = ForwardToVllm(app, {}, "fleet-key")
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive():
        return next(messages)

    async def send(message):
        assert not forwarding.client.is_closed or message["type"] == "lifespan.shutdown.complete"

    asyncio.run(forwarding({"type": "lifespan"}, receive, send))
    assert seen == ["lifespan.startup", "lifespan.shutdown"]
    assert forwarding.client.is_closed


def test_requests_for_a_vllm_model_pass_through_with_the_fleets_key(root, server):
    """The front server forwards a vLLM model's requests as they came and answers as the
    upstream does, streamed or not; llmpipe's own server, with a key, stands in for vLLM."""
    from openai import OpenAI

    from llmpipe.serve.vllm import VllmFleet

    upstream = LiveServer(build_engine(root, {}, scores=False, limits=LIMITS), api_key="fleet")
    fleet = VllmFleet({"finetune": root / layout.FINETUNE_MODEL}, upstream.port, root, key="fleet")
    engine = build_engine(
        root, {}, pipeline=False, scores=False, limits=LIMITS, served_elsewhere=["finetune"]
    )
    front = LiveServer(engine, api_key=KEY, vllm=fleet)
    try:
        client = OpenAI(base_url=f"{front.url}/v1", api_key=KEY, max_retries=0)
        direct = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        models = {m.id: m.owned_by for m in client.models.list().data}
        assert models == {"finetune": "vllm"}
        request = dict(model="finetune", prompt=PROMPT, max_tokens=8, seed=3, **SAMPLING)
        assert (
            client.completions.create(**request).choices[0].text
            == direct.completions.create(**request).choices[0].text
        )
        streamed = "".join(
            c.choices[0].text for c in client.completions.create(stream=True, **request)
        )
        assert streamed == direct.completions.create(**request).choices[0].text
        scored = client.completions.create(
            model="finetune", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0
        )
        assert scored.choices[0].logprobs.token_logprobs[0] is None  # the body went whole
        no_key = httpx.post(f"{front.url}/v1/completions", json=request)
        assert no_key.status_code == 401  # the front's key, before any forwarding
        unknown = httpx.post(
            f"{front.url}/v1/completions",
            json={**request, "model": "nope"},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert unknown.status_code == 404  # not vLLM's: llmpipe's own answer
    finally:
        front.stop()
        upstream.stop()
