"""Tiny random Hugging Face models of every supported model type, saved and converted once per session.

Each case builds a Hugging Face model from a config (no downloads), perturbs every
parameter so that norm weights and biases differ from their ones/zeros init (a swapped
norm or a dropped bias would otherwise go unnoticed) and routers and shared-expert gates
from their zero init, saves it with `save_pretrained` and converts the folder with the
production importer, `mistura.convert.hf.from_hf`. Models run in eval mode, where
mistura's experts are dropless as Hugging Face's are. DeepSeek-V3's selection bias is a
buffer, zero at init: its cases draw it at random, so that it takes part in routing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mistura.convert.hf import from_hf
from mistura.model import Transformer
from mistura.shards import WeightFiles

try:
    import transformers
except ImportError:  # the fixtures below skip the tests that need it
    transformers = None

VOCAB = 160
CONTEXT = 64
# No special tokens: greedy generation must never stop early on an end-of-sequence id.
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
QWEN_EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
# DeepSeek-V3: the first of 3 layers dense, then 8 routed experts (top-2) in 4 groups (2 eligible)
# and a shared one; latent attention with distinct widths everywhere.
DEEPSEEK_V3 = dict(
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    moe_intermediate_size=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    rms_norm_eps=1e-6,
)
# YaRN stretching an original context of 16 tokens 4 times: the tests' sequences reach past 16.
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=CONTEXT // 4)


def _causal_lm(model_class, **overrides) -> torch.nn.Module:
    """A tiny Llama-family `model_class` from its config class: a shared shape, then the overrides."""
    config = dict(
        vocab_size=VOCAB,
        max_position_embeddings=CONTEXT,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        **NO_SPECIAL_TOKENS,
    )
    return model_class(model_class.config_class(**{**config, **overrides}))


def _llama(**overrides) -> torch.nn.Module:
    return _causal_lm(transformers.LlamaForCausalLM, **overrides)


def _deepseek_v3(**overrides) -> torch.nn.Module:
    model = _causal_lm(transformers.DeepseekV3ForCausalLM, **{**DEEPSEEK_V3, **overrides})
    with torch.no_grad():
        for layer in model.model.layers[DEEPSEEK_V3["first_k_dense_replace"] :]:
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.1)
    return model


CASES: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=CONTEXT, n_embd=48, n_layer=2, n_head=4, **NO_SPECIAL_TOKENS
        )
    ),
    "llama-gqa-tied": lambda: _llama(tie_word_embeddings=True),
    "llama-gqa-untied": lambda: _llama(tie_word_embeddings=False),
    "llama-head-dim-theta": lambda: _llama(
        tie_word_embeddings=False,
        head_dim=16,  # != hidden_size / num_attention_heads = 12
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama-bias": lambda: _llama(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    # A window as wide as the context hides nothing.
    "mistral": lambda: _causal_lm(transformers.MistralForCausalLM, sliding_window=CONTEXT, head_dim=16),
    "qwen2": lambda: _causal_lm(transformers.Qwen2ForCausalLM, tie_word_embeddings=True),
    "mixtral": lambda: _causal_lm(transformers.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
    # Three layers, the middle one dense (intermediate_size), the others routed plus a gated shared expert.
    "qwen2-moe-shared-dense": lambda: _causal_lm(
        transformers.Qwen2MoeForCausalLM,
        num_hidden_layers=3,
        mlp_only_layers=[1],
        **QWEN_EXPERTS,
        shared_expert_intermediate_size=64,
    ),
    "qwen3-moe-norm-topk": lambda: _causal_lm(
        transformers.Qwen3MoeForCausalLM, head_dim=16, norm_topk_prob=True, **QWEN_EXPERTS
    ),
    # Raw top-k softmax weights; layers 0 and 2 dense, as decoder_sparse_step=2 makes them.
    "qwen3-moe-raw-topk-step2": lambda: _causal_lm(
        transformers.Qwen3MoeForCausalLM,
        num_hidden_layers=3,
        decoder_sparse_step=2,
        norm_topk_prob=False,
        **QWEN_EXPERTS,
    ),
    # Queries through a low-rank q_a_proj/q_b_proj, rotary channels interleaved (HF's default).
    "deepseek-v3-interleaved": lambda: _deepseek_v3(q_lora_rank=12),
    # Queries from one q_proj, rotary channels split in halves as mistura's, YaRN with both
    # mscales (a cos/sin factor and a softmax scale), tied embeddings.
    "deepseek-v3-yarn": lambda: _deepseek_v3(
        q_lora_rank=None,
        rope_interleave=False,
        rope_parameters=dict(YARN, mscale=0.9, mscale_all_dim=0.7),
        tie_word_embeddings=True,
    ),
    # Interleaved, with YaRN's mscale_all_dim alone: Hugging Face's cos/sin factor is then mscale(factor).
    "deepseek-v3-yarn-interleaved": lambda: _deepseek_v3(
        q_lora_rank=12, rope_parameters=dict(YARN, mscale_all_dim=1.0)
    ),
}


@dataclass
class Saved:
    case: str
    hf_model: torch.nn.Module  # in eval mode
    folder: Path  # what save_pretrained wrote
    checkpoint: Path  # the folder converted by from_hf


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def build_hf(case: str) -> torch.nn.Module:
    """A fresh perturbed Hugging Face model of `case`, the same every time."""
    torch.manual_seed(0)
    return perturbed(CASES[case]())


@pytest.fixture(scope="session")
def saved_case(tmp_path_factory) -> Callable[[str], Saved]:
    """saved_case(name): that case's model, saved and converted, once per session."""
    pytest.importorskip("transformers")
    cache: dict[str, Saved] = {}

    def get(case: str) -> Saved:
        if case not in cache:
            hf_model = build_hf(case)
            folder = tmp_path_factory.mktemp(case)
            hf_model.save_pretrained(folder)
            checkpoint = from_hf(folder, tmp_path_factory.mktemp(f"{case}-mistura") / "checkpoint")
            cache[case] = Saved(case, hf_model, folder, checkpoint)
        return cache[case]

    return get


@pytest.fixture(scope="session", params=sorted(CASES))
def saved(request, saved_case) -> Saved:
    """Every case in turn."""
    return saved_case(request.param)


@pytest.fixture
def native(tiny) -> Callable[..., Transformer]:
    """native(preset, **overrides): a perturbed tiny mistura model, built in mistura rather than imported."""

    def make(preset: str = "llama-tiny", **overrides) -> Transformer:
        torch.manual_seed(0)
        return perturbed(Transformer(tiny(preset, **overrides)))

    return make


Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def stored_tensors() -> Callable[[Path], Tensors]:
    """stored_tensors(folder): every tensor of a weights folder (one file or shards), by name."""

    def read(folder: Path) -> Tensors:
        with WeightFiles(folder) as files:
            return {name: files.read(name) for name in files.shapes}

    return read


@pytest.fixture(scope="session")
def assert_same_tensors() -> Callable[[Tensors, Tensors], None]:
    """assert_same_tensors(got, expected): the same names, dtypes and values, bit for bit."""

    def check(got: Tensors, expected: Tensors) -> None:
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), name

    return check


@pytest.fixture(scope="session")
def make_ids() -> Callable[..., torch.Tensor]:
    def make(batch: int, length: int, seed: int = 1) -> torch.Tensor:
        return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))

    return make
