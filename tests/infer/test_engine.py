"""The generation engine: batches with padding, the cache, the end of rows, sampling settings."""

import pytest
import torch

from mistura.errors import ConfigError, DataError
from mistura.infer.engine import generate
from mistura.infer.sampling import Sampling, next_token_probs, penalize_repetition
from mistura.model import Transformer

GREEDY = Sampling(max_new_tokens=10, temperature=0)
PROMPTS = [[5, 17, 3], [8, 1, 44, 9, 23, 60, 2], [70, 12, 33, 4, 90]]  # three lengths

ARCHITECTURES = {
    "llama (RoPE, GQA)": ("llama-tiny", {"n_kv_head": 2}),
    "gpt2 (learned positions)": ("gpt2-baseline-tiny", {}),
    "collaborative experts": ("moc-tiny", {"layer_mlp": ("dense", "moc")}),
    "moe": ("deepseek-moe-tiny", {}),
    "mla (latent cache)": ("dragao-tiny", {"d_ff": 64}),
}


@pytest.fixture(params=list(ARCHITECTURES))
def model(request, tiny):
    preset, overrides = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    return Transformer(tiny(preset, **overrides)).eval()


def test_a_padded_batch_gives_what_each_prompt_gives_alone(model):
    batched = generate(model, PROMPTS, GREEDY)
    alone = [generate(model, [p], GREEDY)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(row) == 10 for row in batched) and len({tuple(r) for r in batched}) == 3


@torch.no_grad()
def test_padded_prefill_logits_equal_unpadded_ones(model):
    cache = model.new_cache(2, 8)
    cache.pad = torch.tensor([4, 0])
    short, long = [1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3, 2]
    batch = model(torch.tensor([[0] * 4 + short, long]), cache)
    torch.testing.assert_close(batch[0, 4:], model(torch.tensor([short]))[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], model(torch.tensor([long]))[0], atol=1e-5, rtol=1e-5)


def test_prefill_once_then_one_token_per_step_without_reallocating(tiny):
    model = Transformer(tiny("llama-tiny")).eval()
    shapes = []
    model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    buffers = []
    original = model.new_cache

    def new_cache(*args, **kwargs):
        cache = original(*args, **kwargs)
        buffers.append((cache, cache.k.data_ptr(), cache.k.shape))
        return cache

    model.new_cache = new_cache
    generate(model, PROMPTS, GREEDY)
    assert shapes == [(3, 7)] + [(3, 1)] * 9  # the last token needs no forward pass
    ((cache, pointer, shape),) = buffers
    assert shape[3] == 7 + 10 and cache.k.data_ptr() == pointer and cache.pos == 7 + 9


def test_rows_end_at_eos_and_the_batch_at_the_last_row(tiny):
    model = Transformer(tiny("llama-tiny")).eval()
    free = generate(model, PROMPTS, GREEDY)
    eos = free[1][3]
    ended = generate(model, PROMPTS, GREEDY, eos_id=eos)
    for row, out in zip(free, ended, strict=True):
        n = row.index(eos) + 1 if eos in row else len(row)
        assert out == row[:n]


def test_on_token_can_end_rows(tiny):
    model = Transformer(tiny("llama-tiny")).eval()
    calls = []

    def on_token(token):
        calls.append(token.clone())
        return torch.tensor([len(calls) >= 2, len(calls) >= 4, False])

    out = generate(model, PROMPTS, GREEDY, on_token=on_token)
    assert [len(r) for r in out] == [2, 4, 10] and len(calls) == 10


def test_generation_stops_at_the_context(tiny):
    model = Transformer(tiny("llama-tiny")).eval()  # max_seq_len 32
    assert len(generate(model, [[1] * 30], Sampling(max_new_tokens=50, temperature=0))[0]) == 2
    with pytest.raises(ConfigError, match="no room to generate"):
        generate(model, [[1] * 32], GREEDY)


@pytest.mark.parametrize(
    "prompts, message",
    [([], "no prompts"), ([[1, 2], []], "prompt 2 is empty"), ([[1, 97]], "outside the vocabulary")],
)
def test_bad_prompts_are_clear_errors(tiny, prompts, message):
    with pytest.raises(DataError, match=message):
        generate(Transformer(tiny("llama-tiny")).eval(), prompts, GREEDY)


def test_sampling_is_seeded(tiny):
    model = Transformer(tiny("llama-tiny")).eval()
    settings = Sampling(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, seed=4)
    first = generate(model, PROMPTS, settings)
    assert generate(model, PROMPTS, settings) == first
    assert generate(model, PROMPTS, Sampling(**{**vars(settings), "seed": 5})) != first


def test_repetition_penalty_changes_greedy_choices(tiny):
    model = Transformer(tiny("llama-tiny")).eval()
    plain = generate(model, [[3, 4]], Sampling(max_new_tokens=20, temperature=0))[0]
    penalized = generate(model, [[3, 4]], Sampling(max_new_tokens=20, temperature=0, repetition_penalty=1e6))[0]
    assert len(set(plain)) < len(plain)  # a random tiny model repeats itself
    assert len(set(penalized)) > len(set(plain))


def test_penalize_repetition_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_top_k_top_p_and_min_p_keep_the_expected_tokens():
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()

    def probs(**settings):
        return next_token_probs(logits, Sampling(**{"temperature": 1.0, "top_k": None, **settings}))[0]

    assert (probs(top_k=2) > 0).tolist() == [True, True, False, False]
    assert (probs(top_p=0.7) > 0).tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.75
    assert (probs(min_p=0.4) > 0).tolist() == [True, True, False, False]  # at least 0.4 * 0.5
    torch.testing.assert_close(probs(min_p=0.4), torch.tensor([2 / 3, 1 / 3, 0, 0]))
    torch.testing.assert_close(probs(), torch.tensor([0.5, 0.25, 0.15, 0.1]))
    torch.testing.assert_close(probs(temperature=0.5), torch.tensor([0.25, 0.0625, 0.0225, 0.01]) / 0.345)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ("fim", "")}, "stop strings"),
    ],
)
def test_out_of_range_sampling_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        Sampling(**settings)
