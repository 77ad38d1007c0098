"""Speculative decoding: greedy output equals the target's, sampling keeps the target's distribution."""

import pytest
import torch
from tokenizers import Tokenizer, models

from mistura.compare.counts import model_counts
from mistura.data.tokenizer import load_tokenizer
from mistura.errors import CheckpointError, ConfigError, DataError
from mistura.infer.engine import generate
from mistura.infer.generate import generate_text
from mistura.infer.sampling import Sampling, next_token_probs
from mistura.infer.speculative import (
    accept_sampled,
    check_tokenizers,
    speculative_generate,
    speculative_generate_text,
)
from mistura.model import Transformer
from mistura.train.config import RunConfig

PROMPT = [5, 17, 3, 60, 2]
GREEDY = Sampling(max_new_tokens=20, temperature=0)


def build(tiny, preset="llama-tiny", seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(preset, **overrides)).eval()


@pytest.fixture
def target(tiny):
    return build(tiny, n_layer=3, n_kv_head=2)


def test_a_draft_equal_to_the_target_is_always_accepted(target):
    new, stats = speculative_generate(target, target, PROMPT, GREEDY, gamma=4)
    assert new == generate(target, [PROMPT], GREEDY)[0]
    assert stats.acceptance_rate == 1.0 and stats.target_passes == 4  # rounds of 5 tokens: 4 + 1 bonus
    assert stats.new_tokens == 20 and stats.tokens_per_target_pass == 5.0
    sampled = Sampling(max_new_tokens=20, temperature=1.0, top_k=None)
    assert speculative_generate(target, target, PROMPT, sampled, gamma=4)[1].acceptance_rate == 1.0


DRAFTS = {
    "llama": ("llama-tiny", dict(n_layer=1, d_model=16, n_head=2, n_kv_head=1)),
    "mla (latent cache)": ("dragao-tiny", dict(n_layer=1, d_ff=64)),
    "gpt2 (learned positions)": ("gpt2-baseline-tiny", dict(n_layer=1)),
}


@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("draft", list(DRAFTS))
def test_greedy_output_is_the_targets_greedy_output(tiny, target, draft, gamma):
    preset, overrides = DRAFTS[draft]
    new, stats = speculative_generate(target, build(tiny, preset, seed=1, **overrides), PROMPT, GREEDY, gamma)
    assert new == generate(target, [PROMPT], GREEDY)[0]
    assert stats.new_tokens == 20 and stats.accepted + stats.target_passes == 20


def test_an_mla_target_with_the_latent_cache(tiny, target):
    mla = build(tiny, "dragao-tiny", d_ff=64)
    new, _ = speculative_generate(mla, target, PROMPT, GREEDY, gamma=3)
    assert new == generate(mla, [PROMPT], GREEDY)[0]


def test_a_draft_that_is_always_wrong_costs_one_target_pass_per_token(tiny, target):
    draft = build(tiny, n_layer=1)
    torch.nn.init.zeros_(draft.lm_head.weight)  # all logits 0: always proposes token 0
    reference = generate(target, [PROMPT], GREEDY)[0]
    assert 0 not in reference
    new, stats = speculative_generate(target, draft, PROMPT, GREEDY, gamma=3)
    assert new == reference
    assert stats.accepted == 0 and stats.target_passes == 20 and stats.proposed == 3 * 17 + 2 + 1  # fewer near the end


def test_the_repetition_penalty_applies_to_both_models(tiny, target):
    penalized = Sampling(max_new_tokens=20, temperature=0, repetition_penalty=3.0)
    new, _ = speculative_generate(target, build(tiny, n_layer=1, seed=1), PROMPT, penalized, gamma=3)
    assert new == generate(target, [PROMPT], penalized)[0]
    assert new != generate(target, [PROMPT], GREEDY)[0]


def test_the_prompt_runs_once_then_each_round_feeds_one_token_and_the_proposals(tiny, target):
    shapes = []
    target.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    twin = build(tiny, n_layer=3, n_kv_head=2)  # the same weights: every proposal accepted
    speculative_generate(target, twin, PROMPT, Sampling(max_new_tokens=12, temperature=0), gamma=3)
    assert shapes == [(1, 5 + 3), (1, 1 + 3), (1, 1 + 3)]  # 3 rounds of 4 tokens


def test_generation_ends_at_eos_and_when_on_token_says_so(tiny, target):
    draft = build(tiny, n_layer=1, seed=1)
    reference = generate(target, [PROMPT], GREEDY)[0]
    eos = reference[6]
    assert speculative_generate(target, draft, PROMPT, GREEDY, eos_id=eos)[0] == reference[: reference.index(eos) + 1]
    seen = []
    new, _ = speculative_generate(target, draft, PROMPT, GREEDY, on_token=lambda t: seen.append(t) or len(seen) == 7)
    assert new == seen == reference[:7]


def test_generation_stops_at_the_context_of_the_target_whatever_the_drafts(tiny, target):
    long = Sampling(max_new_tokens=100, temperature=0)
    short_draft = build(tiny, n_layer=1, max_seq_len=12)
    new, stats = speculative_generate(target, short_draft, PROMPT, long, gamma=4)
    assert new == generate(target, [PROMPT], long)[0] and len(new) == 32 - len(PROMPT)
    assert stats.proposed > 0


@pytest.mark.parametrize("position", [0, 1])
def test_rejection_sampling_keeps_the_target_distribution(position):
    """Over many rounds, the i-th kept token (when the round got that far) follows p_i, not the draft's q_i."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0], [0.1, 0.1, 0.1, 0.2, 0.5], [0.2] * 5])  # (g + 1, V), g = 2
    q = torch.tensor([[0.1, 0.1, 0.2, 0.2, 0.4], [0.4, 0.3, 0.1, 0.1, 0.1]])  # (g, V)
    counts = torch.zeros(5)
    for _ in range(4000):
        proposals = torch.multinomial(q, 1, generator=generator)[:, 0]
        kept = accept_sampled(p, q, proposals, generator)
        if len(kept) > position:
            counts[kept[position]] += 1
    empirical = counts / counts.sum()
    assert 0.5 * (p[position] - q[position]).abs().sum() > 0.3  # accepting every proposal would fail
    assert 0.5 * (empirical - p[position]).abs().sum() < 0.04


def test_speculative_sampling_draws_the_first_token_from_the_target(tiny):
    target = build(tiny, vocab_size=6, n_layer=1, tie_embeddings=False, seed=4)
    draft = build(tiny, vocab_size=6, n_layer=1, tie_embeddings=False, seed=5)
    settings = dict(max_new_tokens=2, temperature=0.05, top_k=None)
    with torch.no_grad():
        p = next_token_probs(target(torch.tensor([[1, 2, 3]]))[:, -1], Sampling(**settings))[0]
        q = next_token_probs(draft(torch.tensor([[1, 2, 3]]))[:, -1], Sampling(**settings))[0]
    counts = torch.zeros(6)
    for seed in range(600):
        new, _ = speculative_generate(target, draft, [1, 2, 3], Sampling(**settings, seed=seed), gamma=2)
        counts[new[0]] += 1
    assert 0.5 * (p - q).abs().sum() > 0.3
    assert 0.5 * (counts / counts.sum() - p).abs().sum() < 0.08


def test_text_generation_equals_the_engines_with_stop_strings(prepared, tiny):
    tokenizer = load_tokenizer(prepared / "tokenizer.json")
    target = build(tiny, vocab_size=384, n_layer=3)
    draft = build(tiny, vocab_size=384, n_layer=1, seed=1)
    free = generate_text(target, tokenizer, ["Capitu"], GREEDY)[0]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    for sampling in (GREEDY, Sampling(max_new_tokens=20, temperature=0, stop=(stop,))):
        pieces = []
        text, _ = speculative_generate_text(target, draft, tokenizer, "Capitu", sampling, on_text=pieces.append)
        assert text == "".join(pieces) == generate_text(target, tokenizer, ["Capitu"], sampling)[0]
    assert stop not in text


def word_tokenizer(*words: str) -> Tokenizer:
    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(("[UNK]", *words))}, unk_token="[UNK]"))


def test_bad_pairs_and_settings_are_clear_errors(tiny, target):
    with pytest.raises(ConfigError, match="vocabulary .*differs"):
        speculative_generate(target, build(tiny, vocab_size=50), PROMPT, GREEDY)
    with pytest.raises(ConfigError, match="one device"):
        speculative_generate(target, build(tiny).to("meta"), PROMPT, GREEDY)
    with pytest.raises(ConfigError, match="gamma"):
        speculative_generate(target, target, PROMPT, GREEDY, gamma=0)
    with pytest.raises(DataError, match="empty"):
        speculative_generate(target, target, [], GREEDY)
    with pytest.raises(ConfigError, match="no room"):
        speculative_generate(target, target, [1] * 32, GREEDY)
    check_tokenizers(word_tokenizer("a", "b"), word_tokenizer("a", "b"))
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        check_tokenizers(word_tokenizer("a", "b"), word_tokenizer("b", "a"))


def test_the_recipe_pairs_a_much_smaller_draft_with_the_target_on_one_tokenizer():
    target, draft = (RunConfig.from_yaml(f"configs/speculative/{name}.yaml") for name in ("target", "draft"))
    assert draft.data == target.data  # one prepared folder: one tokenizer
    assert model_counts(draft.model)["total"] * 10 < model_counts(target.model)["total"]
    assert (draft.train.seed, draft.train.batch_size) == (target.train.seed, target.train.batch_size)
