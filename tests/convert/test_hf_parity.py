"""Parity with Hugging Face through the production importer, on tiny random models.

The models come from conftest.py: one per case, saved with `save_pretrained` and converted
to a mistura checkpoint by `from_hf`, the code behind `mistura convert from-hf`. Logits and
greedy continuations of the loaded checkpoint must match Hugging Face's. The config
readers and the checks on tensor names and shapes are tested here too, on the in-memory API.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import mistura

transformers = pytest.importorskip("transformers")

from mistura.convert.families import model_type_for  # noqa: E402
from mistura.convert.hf import (  # noqa: E402
    config_from_hf,
    load_hf_folder,
    state_dict_from_hf,
)
from mistura.errors import CheckpointError, ConfigError  # noqa: E402

CONTEXT = 64


@torch.no_grad()
def test_logits_match(saved, make_ids):
    ids = make_ids(2, 32)
    model = mistura.load(saved.checkpoint)
    assert not model.training
    torch.testing.assert_close(model(ids), saved.hf_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches(saved, make_ids, greedy):
    prompt = make_ids(2, 8)
    expected = saved.hf_model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False
    )
    assert expected.shape == (2, 32)
    assert torch.equal(greedy(mistura.load(saved.checkpoint), prompt, 24), expected)


@torch.no_grad()
def test_hugging_face_folder_loads_as_it_is(saved, make_ids):
    """mistura.load recognises a Hugging Face folder and imports it in memory, to the same model."""
    ids = make_ids(1, 16)
    assert torch.equal(mistura.load(saved.folder)(ids), mistura.load(saved.checkpoint)(ids))


@pytest.mark.parametrize(
    "case, model_type",
    [
        ("gpt2", "gpt2"),
        ("llama-bias", "llama"),
        ("mistral", "llama"),  # the same architecture: export calls it llama unless told mistral
        ("qwen2", "qwen2"),
        ("mixtral", "mixtral"),
        ("qwen2-moe-shared-dense", "qwen2_moe"),
        ("qwen3-moe-raw-topk-step2", "qwen3_moe"),
        ("deepseek-v3-yarn", "deepseek_v3"),
    ],
)
def test_architecture_tells_the_model_type(saved_case, case, model_type):
    assert model_type_for(load_hf_folder(saved_case(case).folder)[0]) == model_type


def test_bare_base_model_with_mask_buffers_loads(saved_case):
    """Old GPT-2 checkpoints (openai-community/gpt2) hold GPT2Model's names, without the
    `transformer.` prefix, and the causal-mask buffers `h.{i}.attn.bias`."""
    folder = saved_case("gpt2").folder
    config, expected = load_hf_folder(folder)
    stored = load_file(folder / "model.safetensors")
    tensors = {name.removeprefix("transformer."): tensor for name, tensor in stored.items()}
    mask = torch.tril(torch.ones(1, 1, CONTEXT, CONTEXT, dtype=torch.bool))
    tensors |= {f"h.{i}.attn.bias": mask for i in range(config.n_layer)}
    state_dict = state_dict_from_hf("gpt2", tensors, config)
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[name], expected[name]) for name in expected)


LLAMA_DICT = dict(
    model_type="llama",
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=32,
)
GPT2_DICT = dict(model_type="gpt2", vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=32)
MISTRAL_DICT = dict(LLAMA_DICT, model_type="mistral", sliding_window=None)
QWEN2_DICT = dict(LLAMA_DICT, model_type="qwen2")
# The shape of the config-reading tests: every field differs from its default.
SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def test_config_from_hf_reads_llama_fields():
    hf = transformers.LlamaConfig(
        **SHAPE,
        head_dim=16,
        rms_norm_eps=3e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0},
    ).to_dict()
    config = config_from_hf(hf)
    assert (config.vocab_size, config.d_model, config.d_ff, config.n_layer) == (300, 64, 160, 3)
    assert (config.n_head, config.n_kv_head, config.head_dim) == (8, 2, 16)
    assert (config.max_seq_len, config.norm_eps, config.rope_theta) == (128, 3e-6, 250000.0)
    assert config.tie_embeddings and not config.bias


def test_config_from_hf_reads_gpt2_fields():
    hf = transformers.GPT2Config(
        vocab_size=300,
        n_positions=128,
        n_embd=64,
        n_layer=3,
        n_head=8,
        n_inner=100,
        layer_norm_epsilon=3e-6,
        tie_word_embeddings=False,
    ).to_dict()
    config = config_from_hf(hf)
    assert (config.vocab_size, config.d_model, config.d_ff, config.n_layer) == (300, 64, 100, 3)
    assert (config.n_head, config.max_seq_len, config.norm_eps) == (8, 128, 3e-6)
    assert (config.mlp, config.norm, config.position) == ("gelu_tanh", "layernorm", "learned")
    assert config.bias and not config.tie_embeddings


def test_config_from_hf_reads_mistral_fields():
    hf = transformers.MistralConfig(
        **SHAPE,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ).to_dict()
    config = config_from_hf(hf)
    assert (config.n_head, config.n_kv_head, config.head_dim, config.d_ff) == (8, 2, 8, 160)
    assert (config.mlp, config.norm, config.rope_theta) == ("swiglu", "rmsnorm", 1e6)
    assert not config.bias and not config.qkv_bias and not config.tie_embeddings


def test_config_from_hf_reads_qwen2_fields():
    hf = transformers.Qwen2Config(
        **SHAPE,
        tie_word_embeddings=True,
    ).to_dict()
    config = config_from_hf(hf)
    assert config.qkv_bias and not config.bias  # q/k/v biases, none on o_proj or the MLP
    assert config.tie_embeddings and config.layer_mlp == ("dense",) * 3


def test_config_from_hf_reads_pre_v5_rope_theta():
    hf = dict(LLAMA_DICT, rope_theta=500000.0, rope_scaling=None)
    assert config_from_hf(hf).rope_theta == 500000.0


MIXTRAL_DICT = dict(LLAMA_DICT, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
QWEN3_MOE_DICT = dict(
    LLAMA_DICT, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16
)
QWEN2_MOE_DICT = dict(QWEN3_MOE_DICT, model_type="qwen2_moe", shared_expert_intermediate_size=48)


def test_config_from_hf_reads_mixtral_fields():
    hf = transformers.MixtralConfig(
        **SHAPE,
        num_local_experts=6,
        num_experts_per_tok=3,
        router_aux_loss_coef=0.02,
        router_jitter_noise=0.1,
    ).to_dict()
    config = config_from_hf(hf)
    assert config.layer_mlp == ("moe",) * 3
    moe = config.moe
    assert (moe.n_experts, moe.top_k, moe.d_expert, moe.scoring, moe.norm_topk) == (6, 3, 160, "softmax", True)
    # Training choices keep mistura's defaults: no auxiliary loss, dropless routing.
    assert moe.aux_loss_weight == 0 and moe.capacity_factor is None
    assert not config.bias and not config.qkv_bias


def test_missing_mixtral_options_take_its_defaults():
    config, defaults = config_from_hf(MIXTRAL_DICT), transformers.MixtralConfig()
    assert config.norm_eps == defaults.rms_norm_eps
    assert config.rope_theta == defaults.rope_parameters["rope_theta"]


def test_config_from_hf_reads_qwen2_moe_fields():
    hf = transformers.Qwen2MoeConfig(
        **dict(SHAPE, num_hidden_layers=4),
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        norm_topk_prob=True,
        mlp_only_layers=[2],
    ).to_dict()
    config = config_from_hf(hf)
    assert config.layer_mlp == ("moe", "moe", "dense", "moe")
    assert config.d_ff == 160  # the dense layer's width
    moe = config.moe
    assert (moe.n_experts, moe.top_k, moe.d_expert, moe.d_shared) == (6, 2, 32, 96)
    assert moe.shared_gate and moe.norm_topk
    assert config.qkv_bias and not config.bias  # q/k/v biases, none on o_proj


def test_config_from_hf_reads_qwen3_moe_fields():
    hf = transformers.Qwen3MoeConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    ).to_dict()
    assert "num_experts" not in hf  # saved under its alias, num_local_experts
    config = config_from_hf(hf)
    assert config.qk_norm and not config.qkv_bias and config.head_dim == 16
    assert (config.moe.n_experts, config.moe.d_expert, config.moe.d_shared) == (6, 32, 0)
    assert config_from_hf(QWEN3_MOE_DICT).moe.n_experts == 8  # as Hub configs name it


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(decoder_sparse_step=2),
        dict(mlp_only_layers=[0, 3]),
        dict(decoder_sparse_step=2, mlp_only_layers=[3]),
    ],
    ids=["all-sparse", "step-2", "mlp-only", "both"],
)
def test_qwen_moe_layer_kinds_follow_hugging_face(options):
    """Which layers have experts is decided as Hugging Face's decoder layers decide it."""
    hf_config = transformers.Qwen3MoeConfig(**dict(QWEN3_MOE_DICT, num_hidden_layers=4, **options))
    with torch.device("meta"):
        layers = transformers.Qwen3MoeForCausalLM(hf_config).model.layers
    expected = tuple("moe" if hasattr(layer.mlp, "experts") else "dense" for layer in layers)
    assert config_from_hf(hf_config.to_dict()).layer_mlp == expected


def test_sliding_window_as_wide_as_the_context_is_accepted():
    """A window of max_position_embeddings or more never hides a token (LLAMA_DICT's is 32)."""
    assert config_from_hf(dict(MIXTRAL_DICT, sliding_window=32)).max_seq_len == 32
    assert config_from_hf(dict(QWEN2_MOE_DICT, use_sliding_window=True, sliding_window=64)).max_seq_len == 32
    assert config_from_hf(dict(QWEN3_MOE_DICT, use_sliding_window=False, sliding_window=4)).max_seq_len == 32
    assert config_from_hf(dict(MISTRAL_DICT, sliding_window=32)).max_seq_len == 32
    assert config_from_hf(dict(QWEN2_DICT, use_sliding_window=False, sliding_window=4)).max_seq_len == 32


@pytest.mark.parametrize(
    "hf_config, culprit",
    [
        (
            dict(model_type="bert"),
            r"'bert' is not supported; supported: deepseek_v3, gpt2, llama, mistral, mixtral, qwen2, qwen2_moe, "
            "qwen3_moe",
        ),
        (dict(LLAMA_DICT, quantization_config={"quant_method": "fp8"}), r"mistura convert fp8-to-bf16"),
        (dict(LLAMA_DICT, quantization_config={"quant_method": "gptq", "bits": 4}), r"quant_method 'gptq'"),
        (  # MistralConfig's default window, narrower than this context
            dict({k: v for k, v in MISTRAL_DICT.items() if k != "sliding_window"}, max_position_embeddings=8192),
            "sliding_window=4096",
        ),
        (dict(MISTRAL_DICT, sliding_window=16), "mistral config: sliding_window=16 is not supported"),
        (dict(QWEN2_DICT, use_sliding_window=True, sliding_window=16), "qwen2 config: sliding_window=16"),
        (dict(QWEN2_DICT, hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(GPT2_DICT, activation_function="relu"), "activation_function='relu'"),
        (dict(LLAMA_DICT, hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(LLAMA_DICT, rope_parameters={"rope_type": "llama3", "factor": 8.0}), "'llama3'"),
        (dict(LLAMA_DICT, rope_scaling={"type": "linear", "factor": 2.0}), "'linear'"),
        (dict(LLAMA_DICT, attention_bias=True, mlp_bias=False), "mlp_bias=False"),
        ({k: v for k, v in LLAMA_DICT.items() if k != "hidden_size"}, "missing 'hidden_size'"),
        (dict(MIXTRAL_DICT, sliding_window=16), "sliding_window=16 is not supported"),
        (dict(QWEN2_MOE_DICT, use_sliding_window=True, sliding_window=16), "sliding_window=16"),
        (dict(QWEN3_MOE_DICT, use_sliding_window=True, sliding_window=16), "sliding_window=16"),
        (dict(QWEN3_MOE_DICT, rope_parameters={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
        (dict(QWEN3_MOE_DICT, attention_bias=True), "attention_bias=True"),
        (dict(MIXTRAL_DICT, hidden_act="gelu"), "hidden_act='gelu'"),
        ({k: v for k, v in QWEN2_MOE_DICT.items() if k != "moe_intermediate_size"}, "'moe_intermediate_size'"),
    ],
)
def test_unsupported_config_is_refused(hf_config, culprit):
    with pytest.raises(ConfigError, match=culprit):
        config_from_hf(hf_config)


def test_config_without_hf_counterpart_is_refused():
    config = dataclasses.replace(config_from_hf(LLAMA_DICT), adaptive_norm=True)
    with pytest.raises(ConfigError, match=r"no source in llama checkpoints: blocks\.0\.attn_norm\.alpha"):
        state_dict_from_hf("llama", {}, config)


def test_stored_copy_of_tied_head_is_skipped(saved_case):
    """Older tied checkpoints also store `lm_head.weight`; like Hugging Face, use the embedding."""
    folder = saved_case("gpt2").folder
    config, expected = load_hf_folder(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["transformer.wte.weight"])
    state_dict = state_dict_from_hf("gpt2", tensors, config)
    assert torch.equal(state_dict["lm_head.weight"], expected["tok_emb.weight"])


def _config_and_tensors(saved) -> tuple[mistura.ModelConfig, dict]:
    """(config, tensors) of a saved model, as read from its folder."""
    return config_from_hf(saved.hf_model.config.to_dict()), load_file(saved.folder / "model.safetensors")


@pytest.fixture
def gpt2_tensors(saved_case):
    return _config_and_tensors(saved_case("gpt2"))


@pytest.fixture
def moe_tensors(saved_case):
    """For the experts' layout and errors: routed experts, a shared expert and a dense layer."""
    return _config_and_tensors(saved_case("qwen2-moe-shared-dense"))


def test_missing_tensor_is_named(gpt2_tensors):
    config, tensors = gpt2_tensors
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"missing transformer\.h\.1\.mlp\.c_fc\.bias"):
        state_dict_from_hf("gpt2", tensors, config)


def test_extra_tensor_is_named(gpt2_tensors):
    config, tensors = gpt2_tensors
    tensors["transformer.h.2.ln_1.weight"] = torch.ones(config.d_model)  # a third layer
    with pytest.raises(CheckpointError, match=r"unexpected tensors transformer\.h\.2\.ln_1\.w"):
        state_dict_from_hf("gpt2", tensors, config)


def test_wrong_shape_is_named(gpt2_tensors):
    config, tensors = gpt2_tensors
    name = "transformer.h.0.attn.c_attn.weight"
    tensors[name] = tensors[name].t().contiguous()  # saved as nn.Linear would, not as Conv1D
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight: shape \(144, 48\)"):
        state_dict_from_hf("gpt2", tensors, config)


def test_experts_are_stacked_in_order(moe_tensors):
    config, tensors = moe_tensors
    state_dict = state_dict_from_hf("qwen2_moe", tensors, config)
    stacked = state_dict["blocks.2.mlp.experts.down_proj"]
    assert stacked.shape == (8, 48, 32)
    assert all(torch.equal(stacked[e], tensors[f"model.layers.2.mlp.experts.{e}.down_proj.weight"]) for e in range(8))
    # Qwen has no selection bias: a zero one selects plain top-k.
    assert torch.equal(state_dict["blocks.2.mlp.router.expert_bias"], torch.zeros(8))


def test_missing_expert_is_named(moe_tensors):
    config, tensors = moe_tensors
    del tensors["model.layers.2.mlp.experts.7.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight"):
        state_dict_from_hf("qwen2_moe", tensors, config)


def test_extra_expert_is_named(moe_tensors):
    config, tensors = moe_tensors
    tensors["model.layers.0.mlp.experts.8.up_proj.weight"] = tensors["model.layers.0.mlp.experts.7.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected tensors model\.layers\.0\.mlp\.experts\.8\.up"):
        state_dict_from_hf("qwen2_moe", tensors, config)


def test_experts_in_a_dense_layer_are_unexpected(moe_tensors):
    """The config makes layer 1 dense: a checkpoint with experts there does not match it."""
    config, tensors = moe_tensors
    tensors["model.layers.1.mlp.gate.weight"] = tensors["model.layers.0.mlp.gate.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected tensors model\.layers\.1\.mlp\.gate\.weight"):
        state_dict_from_hf("qwen2_moe", tensors, config)


def test_wrong_expert_shape_is_named(moe_tensors):
    config, tensors = moe_tensors
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    tensors[name] = tensors[name].t().contiguous()
    with pytest.raises(
        CheckpointError, match=r"experts\.3\.down_proj\.weight: shape \(32, 48\) .* expected \(48, 32\)"
    ):
        state_dict_from_hf("qwen2_moe", tensors, config)
