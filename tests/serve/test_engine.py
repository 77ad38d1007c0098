"""The serving engine: continuous batching over the paged cache gives every request what it gets alone, and gives
back every block; prefixes are shared, pools too small preempt instead of failing."""

import pytest
import torch

from mistura.errors import ConfigError, DataError
from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling
from mistura.model import Transformer
from mistura.quant.model import QuantConfig, quantize_model
from mistura.serve.engine import Engine, Request
from tests.infer.test_engine import ARCHITECTURES

GREEDY = Sampling(max_new_tokens=8, temperature=0)
PROMPTS = [[(7 * i + 3 * j) % 90 + 1 for j in range(3 + (5 * i) % 17)] for i in range(12)]  # 3 to 19 tokens
LONGEST = PROMPTS[10]


def tiny_model(tiny, architecture="llama (RoPE, GQA)"):
    preset, overrides = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    return Transformer(tiny(preset, **overrides)).eval()


def run(engine, requests):
    """Add requests {id: Request} and step until done: {(id, index): tokens}, and the peak of blocks used."""
    for request_id, request in requests.items():
        engine.add(request_id, request)
    out, peak = {}, 0
    for _ in range(2000):
        if not engine.has_work:
            break
        for event in engine.step():
            out.setdefault((event.request_id, event.index), []).append(event.token)
        peak = max(peak, engine.stats().blocks_used)
    assert not engine.has_work
    return out, peak


def alone(model, prompt, sampling=GREEDY):
    return generate(model, [prompt], sampling)[0]


@pytest.mark.parametrize("budget", [16, 64], ids=["prefill-in-chunks", "packed-beyond-the-context"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_interleaved_requests_give_what_each_gives_alone_and_free_every_block(tiny, architecture, budget):
    model = tiny_model(tiny, architecture)  # a 32-token context: 64 packed tokens hold several whole prompts
    engine = Engine(model, None, max_seqs=5, block_size=4, max_batched_tokens=budget)
    out, _ = run(engine, {str(i): Request(p, GREEDY) for i, p in enumerate(PROMPTS)})
    assert {int(k[0]): v for k, v in out.items()} == {i: alone(model, p) for i, p in enumerate(PROMPTS)}
    stats = engine.stats()
    assert stats.blocks_used == 0 and stats.running == stats.waiting == 0 and stats.generated_tokens == 12 * 8


@pytest.mark.parametrize("architecture", ["llama (RoPE, GQA)", "mla (latent cache)"])
def test_flex_attention_reads_the_pages_in_place_and_answers_the_same(tiny, architecture, eager_flex):
    """Shared prefix blocks, forks copied on write, preemptions: FlexAttention's block mask follows them all."""
    model = tiny_model(tiny, architecture)
    requests = {str(i): Request(p, GREEDY) for i, p in enumerate(PROMPTS)}
    requests["n"] = Request(PROMPTS[8], Sampling(max_new_tokens=6, temperature=1.0, top_k=None, seed=3), n=3)
    results = []
    for attention in ("gather", "flex"):
        engine = Engine(model, None, max_seqs=6, block_size=4, n_blocks=12, max_batched_tokens=16, attention=attention)
        engine.add("shared", Request(PROMPTS[10] + [1], GREEDY))
        results.append(run(engine, requests | {"again": Request(PROMPTS[10] + [2], GREEDY)})[0])
        assert engine.stats().preemptions > 0 and engine.stats().prefix_hit_tokens > 0
        assert bool(eager_flex) == (attention == "flex")  # the flex kernel ran, and only for flex
    gathered, flexed = results
    assert flexed == gathered
    want = {(str(i), 0): alone(model, p) for i, p in enumerate(PROMPTS)}
    assert {k: v for k, v in flexed.items() if k[0].isdigit()} == want


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantised_model_serves_as_it_generates(tiny, fmt):
    model = quantize_model(tiny_model(tiny, "moe"), QuantConfig(fmt, group_size=16 if fmt == "int4" else None))
    out, _ = run(Engine(model, None, block_size=4), {str(i): Request(p, GREEDY) for i, p in enumerate(PROMPTS[:4])})
    assert {int(k[0]): v for k, v in out.items()} == {i: alone(model, p) for i, p in enumerate(PROMPTS[:4])}


def test_a_shared_prefix_is_computed_once_and_uses_fewer_blocks(tiny):
    model = tiny_model(tiny)
    system = [(5 * j) % 80 + 2 for j in range(16)]
    shared = Engine(model, None, block_size=4)
    separate = Engine(model, None, block_size=4, prefix_caching=False)
    results = []
    for engine in (shared, separate):  # b arrives while a decodes, its prefix computed
        engine.add("a", Request(system + [3, 4], GREEDY))
        first = engine.step()
        out, peak = run(engine, {"b": Request(system + [9], GREEDY)})
        out[("a", 0)] = [first[0].token, *out[("a", 0)]]
        results.append((out, peak))
    (out, peak), (out_separate, peak_separate) = results
    assert out == out_separate == {("a", 0): alone(model, system + [3, 4]), ("b", 0): alone(model, system + [9])}
    print(f"peak blocks: {peak} with the prefix shared, {peak_separate} without")
    assert peak == peak_separate - 4  # the 4 blocks of the 16 prefix tokens, held once
    assert shared.stats().prefix_hit_tokens == 16 and separate.stats().prefix_hit_tokens == 0
    again, _ = run(shared, {"c": Request(system + [3, 4], GREEDY)})  # the released prefix stays cached
    assert again == {("c", 0): out[("a", 0)]} and shared.stats().prefix_hit_tokens == 32


def test_a_pool_too_small_for_all_preempts_and_still_answers_each_request_exactly(tiny):
    model = tiny_model(tiny)
    engine = Engine(model, None, max_seqs=6, block_size=4, n_blocks=8)  # 19 + 8 tokens take 7 blocks
    out, peak = run(engine, {str(i): Request(p, GREEDY) for i, p in enumerate(PROMPTS)})
    assert {int(k[0]): v for k, v in out.items()} == {i: alone(model, p) for i, p in enumerate(PROMPTS)}
    assert engine.stats().preemptions > 0 and peak <= 8 and engine.stats().blocks_used == 0


def test_n_completions_share_the_prompt_and_follow_their_own_seeds(tiny):
    model = tiny_model(tiny)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_k=None, seed=11)
    engine = Engine(model, None, block_size=4)
    prompt = PROMPTS[8]  # 9 tokens: its last block is shared partly filled, then copied on write
    engine.add("r", Request(prompt, sampling, n=3, logprobs=2))
    events = [event for _ in range(20) for event in engine.step()]
    out = {i: [e.token for e in events if e.index == i] for i in range(3)}
    for index in range(3):
        seeded = Sampling(max_new_tokens=6, temperature=1.0, top_k=None, seed=11 + index)
        assert out[index] == alone(model, prompt, seeded)
        # each token's log-probability is the full sequence's: no completion read another's keys and values
        want = torch.log_softmax(model(torch.tensor([prompt + out[index]]))[0, len(prompt) - 1 : -1], dim=-1)
        mine = [e for e in events if e.index == index]
        assert [e.logprob for e in mine] == pytest.approx(
            want.gather(1, torch.tensor(out[index])[:, None]).view(-1).tolist(), abs=1e-5
        )
        assert [e.top_logprobs[0][0] for e in mine] == want.argmax(-1).tolist()
    assert len({tuple(v) for v in out.values()}) == 3 and engine.stats().blocks_used == 0


def test_decodes_run_every_step_while_a_long_prompt_is_prefilled_in_chunks(tiny):
    model = tiny_model(tiny)
    engine = Engine(model, None, block_size=4, max_batched_tokens=4)
    engine.add("short", Request([1, 2], Sampling(max_new_tokens=10, temperature=0)))
    engine.step()
    engine.add("long", Request(LONGEST, GREEDY))  # 19 tokens: 7 steps of 3 beside the decode
    per_step = [[e.request_id for e in engine.step()] for _ in range(7)]
    assert per_step == [["short"]] * 6 + [["short", "long"]]


def test_static_batching_and_aborts(tiny):
    model = tiny_model(tiny)
    engine = Engine(model, None, max_seqs=3, block_size=4, static_batching=True)
    out, _ = run(engine, {str(i): Request(p, GREEDY) for i, p in enumerate(PROMPTS[:5])})
    assert {int(k[0]): v for k, v in out.items()} == {i: alone(model, p) for i, p in enumerate(PROMPTS[:5])}
    engine.add("gone", Request(PROMPTS[3], GREEDY, n=2))
    engine.step()
    assert engine.stats().blocks_used > 0
    engine.abort("gone")
    engine.abort("never-added")
    assert not engine.has_work and engine.stats().blocks_used == 0


def test_bad_requests_and_pools_are_refused(tiny):
    model = tiny_model(tiny)
    engine = Engine(model, None, max_seqs=2, block_size=4)
    with pytest.raises(DataError, match="empty"):
        engine.add("a", Request([], GREEDY))
    with pytest.raises(DataError, match="outside the vocabulary"):
        engine.add("a", Request([1, 500], GREEDY))
    with pytest.raises(ConfigError, match="leaves no room"):
        engine.add("a", Request([1] * 32, GREEDY))
    with pytest.raises(ConfigError, match="n must be between 1 and the 2"):
        engine.add("a", Request([1], GREEDY, n=3))
    with pytest.raises(ConfigError, match="logprobs must be"):
        engine.add("a", Request([1], GREEDY, logprobs=21))
    engine.add("a", Request([1], GREEDY))
    with pytest.raises(ConfigError, match="already in use"):
        engine.add("a", Request([1], GREEDY))
    with pytest.raises(DataError, match="need 7 KV blocks; the pool has 2"):
        Engine(model, None, block_size=4, n_blocks=2).add("b", Request(LONGEST, GREEDY))
    with pytest.raises(ConfigError, match="not both"):
        Engine(model, None, n_blocks=4, kv_bytes=10**6)
    with pytest.raises(ConfigError, match="holds no block"):
        Engine(model, None, kv_bytes=10)
