"""DeepSeek-V3 both ways: its config.json read and written, YaRN as Hugging Face computes it,
multi-token-prediction layers passed over, and mistura's own DeepSeek-V3 shape (dragao-tiny)
run under transformers.

The imported models (interleaved and half-split rotary channels, with and without a query
bottleneck, YaRN with both mscales or with mscale_all_dim alone) are cases of conftest.py:
every parity and export test of test_hf_parity.py and test_hf_export.py runs on them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale  # noqa: E402

from mistura.checkpoint import save_model  # noqa: E402
from mistura.config import MLAConfig, ModelConfig  # noqa: E402
from mistura.convert.hf import config_from_hf, from_hf, hf_config, load_hf_folder, state_dict_from_hf, to_hf  # noqa: E402
from mistura.errors import CheckpointError, ConfigError  # noqa: E402
from mistura.model.mla import MultiHeadLatentAttention  # noqa: E402
from mistura.model.rope import rope_frequencies  # noqa: E402

DEEPSEEK_DICT = dict(
    model_type="deepseek_v3",
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,  # DeepseekV3Config's default is DeepSeek-V3's 128
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=32,
)


def test_config_from_hf_reads_deepseek_v3_fields():
    hf = transformers.DeepseekV3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        moe_intermediate_size=24,
        num_hidden_layers=5,
        first_k_dense_replace=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_routed_experts=12,
        num_experts_per_tok=3,
        n_group=3,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=1.5,
        norm_topk_prob=False,
        q_lora_rank=20,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=6,
        v_head_dim=12,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    config = config_from_hf(hf.to_dict())
    assert config.mla == MLAConfig(
        q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=6, v_head_dim=12
    )
    assert (config.n_head, config.n_kv_head, config.head_dim, config.d_ff) == (8, 8, 6, 160)
    assert (config.rope_theta, config.yarn, config.norm_eps, config.max_seq_len) == (500000.0, None, 1e-6, 128)
    assert config.tie_embeddings and not config.bias
    moe = config.moe
    assert (moe.n_experts, moe.top_k, moe.d_expert, moe.d_shared) == (12, 3, 24, 48)
    assert (moe.n_groups, moe.topk_groups, moe.route_scale, moe.scoring, moe.norm_topk) == (3, 2, 1.5, "sigmoid", False)
    with torch.device("meta"):  # which layers have experts, as Hugging Face's decoder layers decide it
        layers = transformers.DeepseekV3ForCausalLM(hf).model.layers
    assert config.layer_mlp == tuple("moe" if hasattr(layer.mlp, "experts") else "dense" for layer in layers)


# DeepSeek-V3's config.json as published (https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json),
# less its FP8 quantization_config (the weights once converted to bf16) and the remote-code auto_map.
DEEPSEEK_V3_HUB = dict(
    architectures=["DeepseekV3ForCausalLM"], attention_bias=False, attention_dropout=0.0, aux_loss_alpha=0.001,
    bos_token_id=0, eos_token_id=1, ep_size=1, first_k_dense_replace=3, hidden_act="silu", hidden_size=7168,
    initializer_range=0.02, intermediate_size=18432, kv_lora_rank=512, max_position_embeddings=163840,
    model_type="deepseek_v3", moe_intermediate_size=2048, moe_layer_freq=1, n_group=8, n_routed_experts=256,
    n_shared_experts=1, norm_topk_prob=True, num_attention_heads=128, num_experts_per_tok=8, num_hidden_layers=61,
    num_key_value_heads=128, num_nextn_predict_layers=1, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
    rms_norm_eps=1e-06, rope_theta=10000, routed_scaling_factor=2.5, scoring_func="sigmoid", seq_aux=True,
    tie_word_embeddings=False, topk_group=4, topk_method="noaux_tc", torch_dtype="bfloat16", use_cache=True,
    v_head_dim=128, vocab_size=129280,
    rope_scaling=dict(
        beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=4096,
        type="yarn",
    ),
)  # fmt: skip


def test_deepseek_v3_reads_as_the_dragao_671b_preset():
    """The published config.json reads as the preset (bar its training-only balancing rates) and back."""
    imported = config_from_hf(DEEPSEEK_V3_HUB).to_dict()
    preset = ModelConfig.from_name("dragao-671b").to_dict()
    for balancing in ("balance_bias_rate", "seq_aux_loss_weight"):
        imported["moe"][balancing] = preset["moe"][balancing]
    assert dict(imported, name=None) == dict(preset, name=None)
    written = hf_config(ModelConfig.from_name("dragao-671b"))
    differing = {key for key in DEEPSEEK_V3_HUB.keys() & written.keys() if written[key] != DEEPSEEK_V3_HUB[key]}
    assert differing == {"num_nextn_predict_layers"}  # export writes no multi-token-prediction layer
    yarn = {key: value for key, value in DEEPSEEK_V3_HUB["rope_scaling"].items() if key != "type"}
    assert written["rope_parameters"] == dict(yarn, rope_type="yarn", rope_theta=10000.0, truncate=True)


def test_missing_options_take_hugging_face_defaults():
    """A config.json without q_lora_rank, first_k_dense_replace, n_group... means DeepseekV3Config's defaults."""
    minimal = {k: v for k, v in DEEPSEEK_DICT.items() if k not in ("first_k_dense_replace", "n_group", "topk_group")}
    minimal |= dict(num_hidden_layers=4, n_routed_experts=16)
    config = config_from_hf(minimal)
    assert config == config_from_hf(transformers.DeepseekV3Config(**minimal).to_dict())
    assert config.mla.q_lora_rank == 1536 and config.layer_mlp == ("dense",) * 3 + ("moe",)
    assert (config.moe.n_groups, config.moe.topk_groups, config.norm_eps) == (8, 4, 1e-6)


def test_all_dense_config_has_no_experts():
    config = config_from_hf(dict(DEEPSEEK_DICT, first_k_dense_replace=2, topk_method="other"))
    assert config.layer_mlp == ("dense", "dense") and config.moe is None  # the routing options are never read


def test_missing_rope_interleave_means_interleaved(saved_case):
    """DeepseekV3Config's default is rope_interleave=True: a config.json that leaves it out is read interleaved."""
    saved = saved_case("deepseek-v3-interleaved")
    config, expected = load_hf_folder(saved.folder)
    tensors = load_file(saved.folder / "model.safetensors")
    hf = {k: v for k, v in saved.hf_model.config.to_dict().items() if k != "rope_interleave"}
    state_dict = state_dict_from_hf("deepseek_v3", tensors, config, hf)
    assert all(torch.equal(state_dict[name], expected[name]) for name in expected)
    half_split = state_dict_from_hf("deepseek_v3", tensors, config, dict(hf, rope_interleave=False))
    assert not torch.equal(half_split["blocks.0.attn.q_b_proj.weight"], expected["blocks.0.attn.q_b_proj.weight"])


def test_selection_bias_comes_along(saved_case):
    saved = saved_case("deepseek-v3-interleaved")
    state_dict = load_hf_folder(saved.folder)[1]
    bias = saved.hf_model.model.layers[2].mlp.gate.e_score_correction_bias
    assert bias.count_nonzero() == bias.numel()
    assert torch.equal(state_dict["blocks.2.mlp.router.expert_bias"], bias)


YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)

# config.json fragments for RoPE: DeepSeek-V3's own (in the pre-transformers-5 form), and the
# corner cases of Hugging Face's rules for the cos/sin factor.
ROPE_FRAGMENTS = {
    "deepseek-v3-legacy": dict(
        rope_theta=10000.0,
        rope_scaling=dict(
            type="yarn",
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=163840,
    ),
    "mscale-all-dim-alone": dict(rope_parameters=dict(YARN, mscale_all_dim=0.8)),  # cos/sin: mscale(factor)
    "mscale-alone": dict(rope_parameters=dict(YARN, mscale=0.8)),  # cos/sin: mscale(factor) too, not mscale 0.8's
    "both-mscales": dict(rope_parameters=dict(YARN, mscale=0.9, mscale_all_dim=0.7)),
    "explicit": dict(
        rope_parameters=dict(YARN, attention_factor=1.3, beta_fast=16, beta_slow=2, truncate=False, mscale_all_dim=1.0)
    ),
    "no-original-length": dict(
        rope_parameters={k: v for k, v in YARN.items() if k != "original_max_position_embeddings"}
    ),
}


@pytest.mark.parametrize("fragment", ROPE_FRAGMENTS)
def test_yarn_is_read_as_hugging_face_computes_it(fragment):
    """Frequencies, cos/sin factor and softmax scale of the imported config: Hugging Face's for the same config.json."""
    hf = dict(DEEPSEEK_DICT, qk_nope_head_dim=16, qk_rope_head_dim=16, max_position_embeddings=256)
    hf |= ROPE_FRAGMENTS[fragment]
    config, hf_config_ = config_from_hf(hf), transformers.DeepseekV3Config(**hf)
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config_)
    inv_freq, factor = rope_frequencies(config.head_dim, config.rope_theta, config.yarn)
    torch.testing.assert_close(inv_freq.float(), expected_inv_freq, atol=1e-6, rtol=1e-6)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    expected_scale = yarn_apply_mscale(hf_config_.rope_parameters, 32**-0.5)
    assert MultiHeadLatentAttention(config, layer=0).scale == pytest.approx(expected_scale, rel=1e-12)


def _with_mtp_layers(saved, out, count: int) -> None:
    """A copy of a saved DeepSeek-V3 folder with `count` multi-token-prediction layers after its decoder
    layers, laid out as DeepSeek-V3 stores its model.layers.61: a decoder layer plus its own norms,
    projection, head and embedding."""
    shutil.copytree(saved.folder, out)
    tensors = load_file(out / "model.safetensors")
    n_layer, d = saved.hf_model.config.num_hidden_layers, saved.hf_model.config.hidden_size
    last = f"model.layers.{n_layer - 1}."
    for i in range(n_layer, n_layer + count):
        mtp = {
            f"model.layers.{i}." + name.removeprefix(last): t.clone()
            for name, t in tensors.items()
            if name.startswith(last)
        }
        mtp |= {f"model.layers.{i}.{norm}.weight": torch.ones(d) for norm in ("enorm", "hnorm", "shared_head.norm")}
        mtp[f"model.layers.{i}.eh_proj.weight"] = torch.zeros(d, 2 * d)
        mtp[f"model.layers.{i}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        mtp[f"model.layers.{i}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors |= mtp
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def test_multi_token_prediction_layers_are_passed_over(saved_case, tmp_path, stored_tensors, assert_same_tensors):
    saved = saved_case("deepseek-v3-interleaved")
    assert saved.hf_model.config.num_nextn_predict_layers == 1
    _with_mtp_layers(saved, tmp_path / "hf", count=1)
    ckpt = from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert_same_tensors(stored_tensors(ckpt), stored_tensors(saved.checkpoint))


def test_layers_beyond_the_prediction_layers_are_unexpected(saved_case, tmp_path):
    saved = saved_case("deepseek-v3-interleaved")
    _with_mtp_layers(saved, tmp_path / "two", count=2)  # the config counts one
    with pytest.raises(CheckpointError, match=r"unexpected tensors model\.layers\.4\."):
        load_hf_folder(tmp_path / "two")
    _with_mtp_layers(saved, tmp_path / "none", count=1)
    config = json.loads((tmp_path / "none" / "config.json").read_text())
    (tmp_path / "none" / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=0)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors model\.layers\.3\."):
        load_hf_folder(tmp_path / "none")


# mistura's DeepSeek-V3 at test scale: dragao-tiny's options (a dense first layer, sigmoid
# group-limited routing, a shared expert, tied embeddings) with widths small enough for tests.
TINY_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
TINY_MOE = dict(
    n_experts=8, top_k=2, d_expert=16, d_shared=16, scoring="sigmoid", norm_topk=True, n_groups=4, topk_groups=2,
    balance_bias_rate=0.01, seq_aux_loss_weight=1e-4,
)  # fmt: skip
DRAGAO = {
    "experts": dict(),
    "experts-yarn": dict(yarn=dict(factor=4.0, original_max_seq_len=8, mscale=0.9, mscale_all_dim=0.7)),
    "dense-no-q-lora": dict(moe=None, mla=dict(TINY_MLA, q_lora_rank=None), tie_embeddings=False),
}


def _dragao(native, **overrides):
    """A perturbed, scaled-down dragao-tiny whose selection bias has moved, as balancing moves it."""
    model = native("dragao-tiny", **{"n_layer": 3, "mla": TINY_MLA, "moe": TINY_MOE, **overrides})
    with torch.no_grad():
        for block in model.blocks:
            if block.routed:
                block.mlp.router.expert_bias.normal_(std=0.1)
    return model


@pytest.mark.parametrize("case", DRAGAO)
@torch.no_grad()
def test_dragao_tiny_runs_the_same_in_transformers(case, native, tmp_path, stored_tensors, assert_same_tensors, greedy):
    """Exported as deepseek_v3: the same logits and greedy continuation under transformers; back, the same tensors."""
    model = _dragao(native, **DRAGAO[case])
    ckpt = save_model(tmp_path / "ckpt", model)
    out = to_hf(ckpt, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "deepseek_v3" and written["architectures"] == ["DeepseekV3ForCausalLM"]
    assert not written["rope_interleave"] and written["num_nextn_predict_layers"] == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reloaded(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
    prompt = ids[:, :6]
    expected = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=18, do_sample=False)
    assert torch.equal(greedy(model, prompt, 18), expected)
    assert_same_tensors(stored_tensors(from_hf(out, tmp_path / "back")), stored_tensors(ckpt))


@pytest.mark.parametrize(
    "hf, culprit",
    [
        (dict(DEEPSEEK_DICT, rope_parameters={"rope_type": "linear", "factor": 2.0}), "RoPE scaling 'linear'"),
        (dict(DEEPSEEK_DICT, rope_scaling={"type": "dynamic", "factor": 2.0}), "RoPE scaling 'dynamic'"),
        (dict(DEEPSEEK_DICT, rope_parameters={"rope_type": "yarn"}), "YaRN's rope_parameters lack its 'factor'"),
        (dict(DEEPSEEK_DICT, rope_parameters=dict(YARN, partial_rotary_factor=0.5)), "partial_rotary_factor=0.5"),
        (dict(DEEPSEEK_DICT, attention_bias=True), "attention_bias=True"),
        (dict(DEEPSEEK_DICT, num_key_value_heads=2), "num_key_value_heads=2 differs from num_attention_heads=4"),
        (dict(DEEPSEEK_DICT, rms_norm_eps=1e-5), "rms_norm_eps=1e-05 is not supported"),
        (dict(DEEPSEEK_DICT, moe_layer_freq=2), "moe_layer_freq=2"),
        (dict(DEEPSEEK_DICT, topk_method="greedy"), "topk_method='greedy'"),
        (dict(DEEPSEEK_DICT, scoring_func="softmax"), "scoring_func='softmax'"),
        (dict(DEEPSEEK_DICT, n_group=8, topk_group=4), "n_group=8 leaves fewer than two"),
        (dict(DEEPSEEK_DICT, hidden_act="gelu"), "hidden_act='gelu'"),
        ({k: v for k, v in DEEPSEEK_DICT.items() if k != "kv_lora_rank"}, "missing 'kv_lora_rank'"),
    ],
)
def test_unsupported_config_is_refused(hf, culprit):
    assert config_from_hf(DEEPSEEK_DICT).mla is not None  # the base dict itself is fine
    with pytest.raises(ConfigError, match=culprit):
        config_from_hf(hf)


@pytest.mark.parametrize(
    "overrides, model_type, culprit",
    [
        (dict(moe=dict(TINY_MOE, d_shared=24)), None, "moe.d_shared=24 is not a multiple of moe.d_expert=16"),
        (dict(moe=dict(TINY_MOE, scoring="softmax")), None, "scoring_func='softmax' is not supported"),
        (dict(moe=dict(TINY_MOE, shared_gate=True)), None, "deepseek_v3 cannot express moe.shared_gate=True"),
        (dict(norm_eps=1e-5), None, "rms_norm_eps=1e-05"),
        (dict(layer_mlp=("moe", "dense", "moe")), None, r"cannot express .*layer_mlp=\['moe', 'dense', 'moe'\]"),
        (dict(adaptive_norm=True), None, "deepseek_v3 cannot express adaptive_norm=True"),
        (dict(), "llama", r"llama cannot express .*mla="),
        (dict(mla=None, moe=None), "deepseek_v3", "deepseek_v3 has latent attention; this config has none"),
    ],
)
def test_what_deepseek_v3_cannot_express_is_refused(tiny, overrides, model_type, culprit):
    config = tiny("dragao-tiny", **{"n_layer": 3, "mla": TINY_MLA, "moe": TINY_MOE, **overrides})
    with pytest.raises(ConfigError, match=culprit):
        hf_config(config, model_type)
