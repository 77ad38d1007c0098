"""`mistura serve`: OpenAI's own client against the server, run by uvicorn on 127.0.0.1 inside the test process.

Greedy answers are compared with offline generation (mistura.infer.generate_text on the prompt alone); every
client call has a timeout and every wait is bounded.
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import mistura
from mistura.chat_template import load_chat_template
from mistura.cli import main
from mistura.data.tokenizer import EOS_ID
from mistura.infer.engine import generate
from mistura.infer.generate import encode_prompt, generate_text
from mistura.infer.sampling import Sampling
from mistura.serve.app import app_from_checkpoint
from mistura.serve.engine import Engine, Request
from mistura.serve.runner import QueueFull, Runner

MODEL = "tiny"
TIMEOUT = 30  # seconds: every client call, every wait
CONTEXT = 64
PROMPTS = ["Capitu", "O amor é uma coisa", "Naquele tempo, a cidade do Rio de Janeiro", "Ação, coração e emoção"]
WORDS = (
    "Capitu tinha olhos de cigana oblíqua e dissimulada; naquele tempo a cidade era outra, e o coração do "
    "moço batia devagar quando ela passava na rua da Matacavalos com a mãe"
).split()


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    """A run trained for a few steps through `mistura train` on the small corpus: a 64-token context."""
    out = tmp_path_factory.mktemp("serve") / "run"
    config = out.parent / "run.yaml"
    config.write_text(
        f"model: {{preset: llama-tiny, n_layer: 2, d_model: 32, n_head: 4, n_kv_head: 2, d_ff: 64, "
        f"max_seq_len: {CONTEXT}}}\n"
        f"data: {{dir: '{prepared}', vocab_size: 384}}\n"
        f"train: {{out_dir: '{out}', batch_size: 4, max_steps: 10, warmup_steps: 2, eval_interval: 10,"
        " eval_batches: 1, log_interval: 5, lr: 0.01}\n"
    )
    assert main(["train", str(config), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    return mistura.load(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return mistura.load_tokenizer(checkpoint)


@contextmanager
def serving(app):
    """The app served by uvicorn on a free port of 127.0.0.1, in a thread; yields its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(checkpoint):
    """A server whose small KV pool (48 blocks of 4 for 8 sequences of up to 64 tokens) makes sequences preempt."""
    app = app_from_checkpoint(
        checkpoint, model_name=MODEL, max_seqs=8, block_size=4, n_blocks=48, max_batched_tokens=64
    )
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def wait_until(condition, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def http(url: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    """GET (no body) or POST url: the status and the JSON body (the text if it is not JSON)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metrics(server: str) -> dict[str, float]:
    """/metrics as {name: value}; labelled samples as name{label=value,...}."""
    status, text = http(f"{server}/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def idle(server: str) -> bool:
    values = metrics(server)
    return (
        values["mistura_running_sequences"] == values["mistura_kv_blocks_used"] == values["mistura_queue_length"] == 0
    )


def offline(model, tokenizer, prompt: str | list[int], max_tokens: int, stop=()) -> tuple[str, int]:
    """The greedy continuation of the prompt alone, and how many tokens were generated (EOS included)."""
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else prompt
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0, stop=stop)
    text = generate_text(model, tokenizer, [ids], sampling)[0]
    return text, len(generate(model, [ids], Sampling(max_new_tokens=max_tokens, temperature=0), eos_id=EOS_ID)[0])


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http(f"{server}/health") == (200, {"status": "ok", "model": MODEL})


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completions_equal_offline_generation(client, model, tokenizer, prompt):
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    text, generated = offline(model, tokenizer, prompt, 20)
    assert answer.choices[0].text == text
    assert answer.choices[0].finish_reason == ("length" if generated == 20 else "stop")
    prompt_tokens = len(encode_prompt(tokenizer, prompt))
    assert answer.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": prompt_tokens + generated,
    }


def test_token_ids_are_a_prompt_too(client, model, tokenizer):
    ids = encode_prompt(tokenizer, PROMPTS[1])
    answer = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert answer.choices[0].text == offline(model, tokenizer, ids, 12)[0]
    long = (ids * CONTEXT)[: CONTEXT - 5]  # without max_tokens: OpenAI's 16, or what the context has room for
    assert client.completions.create(model=MODEL, prompt=long).usage.completion_tokens <= 5


def test_chat_formats_the_conversation_with_the_checkpoint_template(client, model, tokenizer, checkpoint):
    messages = [{"role": "system", "content": "Você fala de Machado."}, {"role": "user", "content": "Quem é Capitu?"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    template = load_chat_template(checkpoint)
    ids = tokenizer.encode(template.render(messages), add_special_tokens=False).ids
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == offline(model, tokenizer, ids, 16, template.stop)[0]
    assert answer.usage.prompt_tokens == len(ids)
    default = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)  # the rest of the context
    assert default.usage.total_tokens <= CONTEXT and default.choices[0].message.content.startswith(
        answer.choices[0].message.content
    )


def test_a_stream_shows_the_whole_answer_piece_by_piece(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS[2],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text and len(texts) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    messages = [{"role": "user", "content": "Capitu"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stream_never_shows_half_a_character(client, model, tokenizer):
    """Accented letters take two bytes, which this tokenizer may split over two tokens: the first alone decodes to
    U+FFFD (as its logprobs show), and the stream waits for the second to show the letter whole. The streamed text
    is the decoding of all the tokens at once, which offline sampling with the same seed draws."""
    prompt, split = encode_prompt(tokenizer, PROMPTS[3]), False
    for seed in range(10):
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=1, seed=seed, logprobs=0, stream=True
        )
        pieces = [(c.choices[0].text, c.choices[0].logprobs.tokens if c.choices[0].logprobs else []) for c in chunks]
        drawn = generate(model, [prompt], Sampling(40, temperature=1, top_k=None, seed=seed), eos_id=EOS_ID)[0]
        assert "".join(text for text, _ in pieces) == tokenizer.decode(drawn)
        split |= any(
            before == "" and token == ["\ufffd"] and text and "\ufffd" not in text  # waited, then a whole character
            for (before, _), (text, token) in zip(pieces, pieces[1:])
        )
    assert split, "no sampled answer had a character split over two tokens"


def test_stop_strings_cut_the_text_and_end_the_request(server, client, model, tokenizer):
    text = offline(model, tokenizer, PROMPTS[0], 30)[0]
    stop = text[12:15]
    expected = text[: text.index(stop)]
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop, "§"])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "stop")
    chunks = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    wait_until(lambda: idle(server))


def test_seeds_and_n(client):
    def sample(seed: int, n: int = 1) -> list[str]:
        answer = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=1, seed=seed, n=n)
        assert answer.usage.completion_tokens <= 20 * n
        return [choice.text for choice in sorted(answer.choices, key=lambda c: c.index)]

    first = sample(7)
    assert sample(7) == first and sample(8) != first
    assert sample(7, n=2) == [*first, *sample(8)]  # completion i draws with seed + i


def test_logprobs_are_the_models(client, model, tokenizer):
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=3)
    logprobs = answer.choices[0].logprobs
    prompt = encode_prompt(tokenizer, PROMPTS[1])
    new = generate(model, [prompt], Sampling(max_new_tokens=8, temperature=0), eos_id=EOS_ID)[0]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1].float(), dim=-1)
    chosen = expected[torch.arange(len(new)), torch.tensor(new)]
    assert len(logprobs.tokens) == len(new) and logprobs.tokens == [tokenizer.decode([t], False) for t in new]
    assert torch.allclose(torch.tensor(logprobs.token_logprobs), chosen, atol=1e-4)
    for top, token, logprob in zip(logprobs.top_logprobs, logprobs.tokens, logprobs.token_logprobs, strict=True):
        assert len(top) <= 3 and top[token] == logprob == max(top.values())  # greedy: the chosen is the best
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Capitu"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens - (chat.choices[0].finish_reason == "stop")
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob for entry in content)


def test_concurrent_requests_each_get_what_they_get_alone(server, model, tokenizer):
    requests = []
    for i in range(32):
        prompt = " ".join(WORDS[i % 7 : i % 7 + 1 + (5 * i) % 13])  # 2 to 40 tokens
        room = CONTEXT - len(encode_prompt(tokenizer, prompt))
        requests.append((prompt, min(room, 4 + (7 * i) % 29)))

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="-", timeout=TIMEOUT, max_retries=0) as client:
            answers = await asyncio.gather(
                *(client.completions.create(model=MODEL, prompt=p, max_tokens=m, temperature=0) for p, m in requests)
            )
        return [answer.choices[0].text for answer in answers]

    assert asyncio.run(ask_all()) == [offline(model, tokenizer, p, m)[0] for p, m in requests]
    wait_until(lambda: idle(server))


def test_a_client_that_leaves_mid_stream_frees_its_sequences(server, client):
    stream = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=50, temperature=1, n=4, stream=True, seed=0
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    wait_until(lambda: idle(server))
    assert http(f"{server}/health")[0] == 200
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2).choices[0].finish_reason


def test_a_client_that_leaves_is_aborted_within_a_few_steps(checkpoint, model, tokenizer, monkeypatch):
    """A client leaves after two chunks of a 48-token answer that has no EOS, another before its whole answer came:
    the engine drops each request within a few steps, not 48, and frees its blocks."""
    prompt, max_tokens = PROMPTS[0], 48
    assert offline(model, tokenizer, prompt, max_tokens)[1] == max_tokens  # left alone, it runs to max_tokens
    app = app_from_checkpoint(checkpoint, model_name=MODEL)
    step = app.state.runner.engine.step

    def slow_step():
        time.sleep(0.02)  # 48 tokens would take about a second
        return step()

    monkeypatch.setattr(app.state.runner.engine, "step", slow_step)
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", timeout=TIMEOUT, max_retries=0)
        stream = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks), next(chunks)
        stream.close()
        wait_until(lambda: idle(url))
        assert metrics(url)["mistura_generated_tokens_total"] <= 12
        impatient = openai.OpenAI(base_url=f"{url}/v1", api_key="-", timeout=0.3, max_retries=0)
        with pytest.raises(openai.APITimeoutError):  # not streamed: the server notices the closed connection
            impatient.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        wait_until(lambda: idle(url))
        assert metrics(url)["mistura_generated_tokens_total"] <= 12 + 30


BAD = [
    ("completions", b"{not json", 400, None),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "Capitu " * 80}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, None),
    ("completions", {"model": MODEL, "prompt": []}, 400, None),
    ("completions", {"model": MODEL, "prompt": [5, 100_000]}, 400, None),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, None),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, None),
    ("completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 9}, 400, None),  # more than the engine's 8 sequences
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, None),
    ("completions", {"model": MODEL, "prompt": "x", "n": 9, "stream": True}, 400, None),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 99}, 400, None),
    ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("nowhere", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, path, body, status, param):
    got, answer = http(f"{server}/v1/{path}", body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert answer["error"]["param"] == param
    assert client.completions.create(model=MODEL, prompt="Capitu", max_tokens=2).choices[0].text is not None


def test_a_full_queue_answers_429(checkpoint):
    with serving(app_from_checkpoint(checkpoint, model_name=MODEL, max_queue=0)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", timeout=TIMEOUT, max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=MODEL, prompt="Capitu", max_tokens=2)
        assert caught.value.status_code == 429 and caught.value.code == "rate_limit_exceeded"
        assert http(f"{url}/health")[0] == 200


def test_an_engine_failure_answers_500_and_the_server_goes_on(checkpoint, monkeypatch):
    app = app_from_checkpoint(checkpoint, model_name=MODEL)
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", timeout=TIMEOUT, max_retries=0)

        def broken():
            raise RuntimeError("the engine broke")

        monkeypatch.setattr(app.state.runner.engine, "step", broken)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as caught:
                client.completions.create(model=MODEL, prompt="Capitu", max_tokens=2, stream=stream)
            assert caught.value.code is None and "the engine broke" in caught.value.message
        monkeypatch.undo()
        assert client.completions.create(model=MODEL, prompt="Capitu", max_tokens=2).usage.completion_tokens >= 1
        wait_until(lambda: idle(url))


def test_the_runner_refuses_requests_beyond_max_queue(model):
    runner = Runner(Engine(model, EOS_ID), max_queue=2)  # not started: what is submitted waits
    request = Request([1, 5, 6], Sampling(max_new_tokens=2, temperature=0))
    runner.submit("a", request), runner.submit("b", request)
    assert runner.waiting == 2
    with pytest.raises(QueueFull):
        runner.submit("c", request)
    runner.abort("a")  # still counted until the engine has seen it
    assert runner.waiting == 2 and set(runner.live) == {"b"}


def test_an_api_key_guards_the_api(checkpoint):
    with serving(app_from_checkpoint(checkpoint, model_name=MODEL, api_key="sekrit")) as url:
        for key in ("wrong", None):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            status, answer = http(f"{url}/v1/models", headers=headers)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", timeout=TIMEOUT, max_retries=0)
        assert client.completions.create(model=MODEL, prompt="Capitu", max_tokens=2).usage.completion_tokens >= 1
        assert http(f"{url}/health")[0] == 200 and http(f"{url}/metrics")[0] == 200


def test_metrics_report_the_engine_and_the_requests(server, client):
    client.completions.create(model=MODEL, prompt="Capitu", max_tokens=4, temperature=0)
    http(f"{server}/v1/completions", {"model": MODEL, "prompt": ""})
    values = metrics(server)
    for name in ("queue_length", "running_sequences", "kv_blocks_used", "kv_cached_tokens", "preemptions_total"):
        assert values[f"mistura_{name}"] >= 0
    assert values["mistura_kv_blocks_total"] == 48
    assert values["mistura_generated_tokens_total"] >= 4 and values["mistura_generation_tokens_per_second"] > 0
    assert values["mistura_time_to_first_token_seconds_count"] >= 1
    assert values["mistura_prefix_cache_hit_tokens_total"] >= 0
    assert values["mistura_requests_total{endpoint=/v1/completions,status=200}"] >= 1
    assert values["mistura_requests_total{endpoint=/v1/completions,status=400}"] >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["MISSING"], "error: checkpoint not found"),
        (["CKPT", "--kv-bytes", "lots"], "error: --kv-bytes: expected a size"),
        (["CKPT", "--device", "nowhere"], "error: --device"),
        (["CKPT", "--max-queue", "0"], "error: --max-queue must be >= 1"),
    ],
)
def test_serve_bad_input_is_a_one_line_error(checkpoint, tmp_path, capsys, args, message):
    args = [{"MISSING": str(tmp_path / "missing"), "CKPT": str(checkpoint)}.get(a, a) for a in args]
    assert main(["serve", *args, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_mistura_serve_serves(checkpoint, model, tokenizer):
    """The command in a process of its own: it prints its URL, answers with the key from MISTURA_API_KEY, and
    stops on Ctrl-C. Its attention is the compiled flex kernel (one query bucket: 16 tokens per forward)."""
    env = {**os.environ, "MISTURA_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mistura.cli", "serve", str(checkpoint), "--port", "0", "--model-name", "cli"]
    command += ["--attention", "flex", "--max-batched-tokens", "16"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(3 * TIMEOUT)  # the kernel compiles before the line is printed
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", lines[0]).group(0)
        assert "flex paged attention" in lines[0]
        client = openai.OpenAI(base_url=url, api_key="k", timeout=TIMEOUT, max_retries=0)
        wait_until(lambda: http(url.removesuffix("/v1") + "/health")[0] == 200)
        assert [m.id for m in client.models.list().data] == ["cli"]
        for prompt in PROMPTS:
            answer = client.completions.create(model="cli", prompt=prompt, max_tokens=12, temperature=0)
            assert answer.choices[0].text == offline(model, tokenizer, prompt, 12)[0]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(TIMEOUT)
    assert process.returncode == 130, process.stderr.read()  # Ctrl-C's status, as for every command
