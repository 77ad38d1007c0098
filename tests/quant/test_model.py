"""Quantised models: which layers are swapped, logits near the original's, greedy decoding on a KV cache."""

import pytest
import torch
from torch import nn

from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.quant import QuantConfig, quantize_model
from mistura.quant.experts import QuantExperts
from mistura.quant.linear import QuantLinear

# Relative RMS error of a weight of these tiny layers (32 inputs), from each format's precision:
# - int8, one scale per row: amax of 32 Gaussians ~2.1 sigma, step 2.1 sigma / 127, error step / sqrt(12) = 0.5 %;
# - int4 in groups of 32: range ~4.1 sigma, step 4.1 sigma / 15, error 7.9 %;
# - fp8: 3 mantissa bits, 2.6 % on the weights and as much on the activations, 3.7 % together.
# A logit sums many such independent errors, which add in quadrature, through residual streams that
# dilute each layer's share: the logits move by about that much relative to their size, and the
# tolerance is twice it.
WEIGHT_ERROR = {"fp8": 0.037, "int8": 0.005, "int4": 0.079}
RECIPES = {"fp8": QuantConfig("fp8"), "int8": QuantConfig("int8"), "int4": QuantConfig("int4", 32)}
MODELS = {  # the preset and what it exercises
    "gqa": ("llama-tiny", dict(n_kv_head=2)),  # GQA, SwiGLU, tied head
    "mla": ("dragao-tiny", dict(n_layer=2)),  # MLA with a query bottleneck, a dense layer, routed + shared experts
    "gpt2": ("gpt2-baseline-tiny", {}),  # biases, GELU, learned positions
}


def build(tiny, kind: str) -> Transformer:
    torch.manual_seed(0)
    preset, overrides = MODELS[kind]
    return Transformer(tiny(preset, **overrides)).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", RECIPES)
@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_quantised_logits_stay_within_the_format_precision(tiny, kind, fmt):
    model = build(tiny, kind)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    expected = model(idx)
    logits = quantize_model(model, RECIPES[fmt])(idx)
    assert 0 < relative_error(logits, expected) < 2 * WEIGHT_ERROR[fmt]


def test_quantised_layers_are_the_linear_ones_of_attention_mlps_and_experts(tiny):
    model = quantize_model(build(tiny, "mla"), QuantConfig("int8"))
    swapped = {name.split(".", 2)[-1] for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    kept = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    assert swapped >= {"attn.q_a_proj", "attn.q_b_proj", "attn.kv_a_proj", "attn.o_proj", "mlp.gate_proj"}
    assert swapped >= {"mlp.shared.down_proj", "mlp.experts.up_proj.0"}
    assert kept == {"blocks.0.attn.kv_b_proj", "blocks.1.attn.kv_b_proj", "blocks.1.mlp.router.gate", "lm_head"}
    assert isinstance(model.blocks[1].mlp.experts, QuantExperts)
    assert model.lm_head.weight is model.tok_emb.weight


@torch.no_grad()
def test_collaborative_experts_keep_the_weights_their_attentions_read(tiny):
    torch.manual_seed(0)
    model = Transformer(tiny("moc-tiny", layer_mlp=("moc", "moc"), n_layer=2)).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    expected = model(idx)
    logits = quantize_model(model, QuantConfig("int8"))(idx)
    assert not any(isinstance(m, QuantLinear) for m in model.blocks[0].mlp.modules())
    assert 0 < relative_error(logits, expected) < 2 * WEIGHT_ERROR["int8"]


@pytest.mark.parametrize("fmt", RECIPES)
@pytest.mark.parametrize("kind", ["gqa", "mla"])
@torch.no_grad()
def test_quantised_model_decodes_greedily_on_its_cache(tiny, greedy, kind, fmt):
    model = quantize_model(build(tiny, kind), RECIPES[fmt])
    prompt = torch.randint(3, model.config.vocab_size, (1, 5))
    out = greedy(model, prompt, 6)
    # The same tokens as argmax decoding without a cache, recomputing the whole sequence each step.
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_bad_recipes_are_refused(tiny):
    with pytest.raises(ConfigError, match="unknown quantization format 'int3'"):
        QuantConfig("int3")
    with pytest.raises(ConfigError, match="fp8 uses DeepSeek-V3's fixed 128 x 128"):
        QuantConfig("fp8", 64)
    with pytest.raises(ConfigError, match="must be even"):
        QuantConfig("int4", 33)
    with pytest.raises(ConfigError, match="positive"):
        QuantConfig("int8", 0)
    message = "group size 128 does not divide the 32 input channels of blocks.0.attn.q_proj; .* a multiple of 32"
    with pytest.raises(ConfigError, match=message):
        quantize_model(build(tiny, "gqa"), QuantConfig("int4"))


def test_a_quantised_model_is_not_quantised_again(tiny):
    model = quantize_model(build(tiny, "gqa"), QuantConfig("int8"))
    with pytest.raises(ConfigError, match="already quantised"):
        quantize_model(model, QuantConfig("int4", 32))


def test_a_refused_group_size_leaves_the_model_untouched(tiny):
    model = build(tiny, "mla")
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_model(model, QuantConfig("int4", 64))  # the expert width is 64, the model width 32
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", RECIPES)
@torch.no_grad()
def test_quantised_model_on_cuda_gives_the_cpu_logits(tiny, monkeypatch, fmt):
    from mistura.quant import triton_fp8

    calls = []
    fp8_linear = triton_fp8.fp8_linear
    monkeypatch.setattr(triton_fp8, "fp8_linear", lambda *a: calls.append(a) or fp8_linear(*a))
    model = quantize_model(build(tiny, "gqa"), RECIPES[fmt])
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    expected = model(idx)  # the CPU kernels (bf16 activations) for int8 and int4, the reference path for fp8
    logits = model.to("cuda")(idx.cuda()).cpu()  # the reference path for int8 and int4, Triton's kernels for fp8
    assert relative_error(logits, expected) < (1e-4 if fmt == "fp8" else 1e-2)
    assert bool(calls) == (fmt == "fp8" and triton_fp8.available())
