"""`mistura serve` under load: continuous batching against static batching and one request at a time.

The script starts `mistura serve CKPT` on 127.0.0.1 (a free port, nothing else is contacted), sends the
same workload to each server set-up with the official `openai` client, and prints a table:

1. throughput: `--requests` streamed greedy completions of mixed prompt and output lengths, arriving as a
   Poisson process at each `--rates` (requests/s; inf: all at once), at most `--clients` in flight, against
   - continuous batching with the paged KV cache (the default server),
   - static batching of the same requests (`--scheduling static`: a batch is admitted only when the last
     one has finished),
   - one request at a time (`--max-seqs 1`);
   with output tokens/s, time to first token (to its first streamed text) and time per output token (between
   text chunks), p50 and p99, of each;
2. KV memory: the same workload run through the engine in-process, sampling after every step the
   positions held in blocks but not (yet) filled, against the pool, and what a contiguous cache of the
   model's full context per running request would leave unused;
3. prefix caching: requests that share one long system prompt, one at a time, with prefix caching on and
   off: time to first token;
4. paged attention: the throughput workload through the engine in-process, its attention reading the pages
   with `gather` (SDPA over each context read out of the pool) and `flex` (FlexAttention in place).

    .venv/bin/python benchmarks/serve.py runs/quickstart
    .venv/bin/python benchmarks/serve.py runs/quickstart --requests 64 --clients 16 --rates 4 inf

Every phase is bounded: `--requests` requests, each at most `--timeout` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mistura
from mistura.checkpoint import read_config, resolve, save_model
from mistura.config import ModelConfig
from mistura.infer.generate import encode_prompt
from mistura.infer.sampling import Sampling
from mistura.loading import load_tokenizer
from mistura.model import Transformer
from mistura.serve.engine import Engine, Request

TEXT = (
    "Naquele tempo, a cidade do Rio de Janeiro era pequena e cheia de ruas estreitas, onde os homens de negócio "
    "se encontravam à tarde para falar da política, dos preços do café e das moças que passavam à janela. Capitu "
    "olhava tudo com os seus olhos de cigana oblíqua e dissimulada, e eu, que a amava desde menino, não sabia "
    "ainda o que aquele olhar queria dizer. O amor é uma coisa que se aprende tarde, dizia meu tio Cosme, e "
    "José Dias, com os seus superlativos, concordava sempre, porque era o seu ofício concordar."
)
WORDS = TEXT.split()


@dataclass
class Job:
    prompt: str
    max_tokens: int
    arrival: float  # seconds after the start


@dataclass
class Result:
    ttft: float
    per_token: float | None
    tokens: int


def workload(count: int, rate: float, seed: int = 0) -> list[Job]:
    """`count` requests of 4 to 30 words and 8 to 64 new tokens (log-uniform: many short answers, a few long
    ones, as in chat traces; within the quickstart model's 128-token context), arriving as a Poisson process
    at `rate`/s."""
    rng, t, jobs = random.Random(seed), 0.0, []
    for _ in range(count):
        start, words = rng.randrange(len(WORDS) - 30), rng.randint(4, 30)
        new_tokens = round(math.exp(rng.uniform(math.log(8), math.log(64))))
        jobs.append(Job(" ".join(WORDS[start : start + words]), new_tokens, t))
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    return jobs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`mistura serve` in a subprocess on 127.0.0.1, stopped on exit."""

    def __init__(self, checkpoint: str, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mistura.cli", "serve", checkpoint, "--port", str(self.port)]
        command += ["--model-name", "mistura", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"mistura serve exited: {self.process.stderr.read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.5)
        raise SystemExit("mistura serve did not answer /health within 120 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def one(client, job: Job, start: float, gate: asyncio.Semaphore, options: dict) -> Result:
    """Stream one greedy completion; its time to first token and mean time per later token."""
    await asyncio.sleep(max(0.0, start + job.arrival - time.perf_counter()))
    async with gate:
        sent = time.perf_counter()
        stream = await client.completions.create(
            model="mistura",
            prompt=job.prompt,
            max_tokens=job.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
        times, tokens = [], 0
        async for chunk in stream:
            if chunk.choices and (chunk.choices[0].text or chunk.choices[0].logprobs is not None):
                times.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    per_token = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return Result(times[0] - sent if times else math.nan, per_token, tokens)


async def drive(url: str, jobs: list[Job], clients: int, **options) -> tuple[float, list[Result]]:
    """Send `jobs` at their arrival times, at most `clients` at once; the seconds it took and each result."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    gate = asyncio.Semaphore(clients)
    start = time.perf_counter()
    results = await asyncio.gather(*(one(client, job, start, gate, options) for job in jobs))
    seconds = time.perf_counter() - start
    await client.close()
    return seconds, results


def pct(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v is not None and not math.isnan(v))
    return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan


def throughput(args) -> None:
    """Each set-up's own server, all up at once, taking the workload in turn for `--rounds` rounds: the median
    round's output tokens/s, and latencies over all rounds."""
    setups = {
        "continuous (paged)": [],
        "static batching": ["--scheduling", "static"],
        "one at a time": ["--max-seqs", "1"],
    }
    print(f"\n{args.requests} requests, at most {args.clients} in flight, greedy, 8-64 new tokens each, ", end="")
    print(f"median of {args.rounds} rounds\n")
    print("| arrivals/s | set-up | output tok/s | vs one at a time | TTFT p50 / p99 ms | TPOT p50 / p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(Server(args.checkpoint, "--max-seqs", str(args.clients), *options))
            for name, options in setups.items()
        }
        for server in servers.values():
            asyncio.run(drive(server.url, workload(2, math.inf), args.clients, timeout=args.timeout))  # warm up
        for rate in args.rates:
            jobs = workload(args.requests, rate)
            rates, results = {name: [] for name in setups}, {name: [] for name in setups}
            for _ in range(args.rounds):
                for name, server in servers.items():
                    seconds, answers = asyncio.run(drive(server.url, jobs, args.clients, timeout=args.timeout))
                    rates[name].append(sum(r.tokens for r in answers) / seconds)
                    results[name] += answers
            alone = statistics.median(rates["one at a time"])
            for name in setups:
                ttft = [1e3 * r.ttft for r in results[name]]
                tpot = [1e3 * r.per_token for r in results[name] if r.per_token is not None]
                median = statistics.median(rates[name])
                print(
                    f"| {rate:g} | {name} | {median:,.0f} | {median / alone:.2f}x | "
                    f"{pct(ttft, 0.5):,.0f} / {pct(ttft, 0.99):,.0f} | {pct(tpot, 0.5):.1f} / {pct(tpot, 0.99):.1f} |"
                )


def in_process(args) -> tuple[Transformer, list[tuple[list[int], int]]]:
    """The checkpoint's model, and the throughput workload (all at once) as (prompt ids, new tokens) for its engine."""
    model, tokenizer = mistura.load(args.checkpoint), load_tokenizer(args.checkpoint)
    return model, [(encode_prompt(tokenizer, job.prompt), job.max_tokens) for job in workload(args.requests, math.inf)]


def kv_memory(args) -> None:
    """Held-but-unfilled KV positions, averaged over the engine's steps, against a contiguous cache."""
    model, prompts = in_process(args)
    context = model.config.max_seq_len
    print(f"\nKV memory, {args.requests} requests at once, {args.clients} running, averaged over the steps:")
    print("| cache | positions held | unfilled, of the pool | unfilled, of what is held |")
    print("|---|---:|---:|---:|")
    for block_size in args.block_sizes:
        engine = Engine(model, None, max_seqs=args.clients, block_size=block_size)
        pool = engine.stats().blocks_total * block_size
        for i, (prompt, new) in enumerate(prompts):
            engine.add(str(i), Request(prompt, Sampling(max_new_tokens=new, temperature=0)))
        steps = held = unused = contiguous = 0
        while engine.has_work:
            engine.step()
            stats = engine.stats()
            steps, held = steps + 1, held + stats.blocks_used * block_size
            unused += stats.blocks_used * block_size - stats.cached_tokens
            contiguous += stats.running * context - stats.cached_tokens
        print(
            f"| paged, blocks of {block_size} | {held / steps:,.0f} of {pool:,} | {100 * unused / steps / pool:.1f} % "
            f"| {100 * unused / held:.1f} % |"
        )
    print(f"| contiguous, {context} per request | | {100 * contiguous / steps / pool:.1f} % | |")


def attention(args) -> None:
    """The engine in-process on the throughput workload (all at once), with each way of reading the pages:
    steps, milliseconds per step and output tokens/s; flex's compile time apart."""
    model, prompts = in_process(args)
    print(f"\nPaged attention, the engine in-process, {args.requests} requests at once, {args.clients} running:")
    print("| attention | compile s | steps | ms per step | output tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    rates = {}
    for name in ("gather", "flex"):
        start = time.perf_counter()
        engine = Engine(model, None, max_seqs=args.clients, attention=name)
        compiled = time.perf_counter() - start
        best = math.inf
        for _ in range(args.rounds):
            for i, (prompt, new) in enumerate(prompts):
                engine.add(str(i), Request(prompt, Sampling(max_new_tokens=new, temperature=0)))
            start, steps = time.perf_counter(), 0
            while engine.has_work:
                engine.step()
                steps += 1
            best = min(best, time.perf_counter() - start)
        rates[name] = sum(new for _, new in prompts) / best
        print(
            f"| {name} | {compiled:.1f} | {steps} | {1e3 * best / steps:.2f} | {rates[name]:,.0f} "
            f"| {rates[name] / rates['gather']:.2f}x |"
        )


def long_context_checkpoint(source: str, folder: Path) -> str:
    """A random-weights Llama of ~25M parameters and a 1,024-token context, with `source`'s tokenizer: a model
    whose long prefill costs what it costs in real serving (the quickstart model's context is 128 tokens)."""
    vocab = read_config(resolve(source)).vocab_size
    config = ModelConfig.from_name("llama-tiny", vocab_size=vocab, max_seq_len=1024, n_layer=6, d_model=512, d_ff=1408)
    save_model(folder, Transformer(config), resolve(source) / "tokenizer.json")
    return str(folder)


def prefix(args) -> None:
    """Time to first token of requests sharing one long system prompt, with prefix caching on and off."""
    tokenizer = load_tokenizer(args.checkpoint)
    system = tokenizer.decode(encode_prompt(tokenizer, " ".join([TEXT] * 12))[:900])
    questions = [" ".join(WORDS[i : i + 4]) for i in range(0, 4 * args.prefix_requests, 4)]
    jobs = [Job(f"{system}\n{q}", 8, 0.0) for q in questions]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = long_context_checkpoint(args.checkpoint, Path(folder) / "long")
        print(f"\nA shared system prompt of {len(encode_prompt(tokenizer, system))} tokens, requests one at a time:")
        ttfts = {}
        for name, options in {"prefix caching on": [], "prefix caching off": ["--no-prefix-caching"]}.items():
            with Server(checkpoint, *options) as server:
                # a chunk for every token, even one whose text waits for the next (the random model's split characters)
                _, results = asyncio.run(drive(server.url, jobs, 1, timeout=args.timeout, logprobs=0))
            ttfts[name] = statistics.median(1e3 * r.ttft for r in results[1:])  # the first computes the prefix
            print(f"  {name}: median time to first token {ttfts[name]:.1f} ms")
    print(f"  prefix caching cuts it {ttfts['prefix caching off'] / ttfts['prefix caching on']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="runs/quickstart")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, math.inf])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--prefix-requests", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"no checkpoint at {args.checkpoint}: run `make quickstart` first, or give one")
    print(f"checkpoint {args.checkpoint}, {os.cpu_count()} CPUs, torch threads per server: default")
    throughput(args)
    kv_memory(args)
    prefix(args)
    attention(args)


if __name__ == "__main__":
    main()
