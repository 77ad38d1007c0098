"""Export to Hugging Face: `to_hf` folders that transformers loads with no custom code, to the same logits.

Three directions are checked: Hugging Face -> mistura -> Hugging Face gives back every tensor
of the original folder bit for bit (the name tables inverted; DeepSeek-V3's interleaved
rotary rows come back in mistura's half-split order, as config.json then says); mistura -> Hugging Face ->
mistura gives back every tensor of the checkpoint, dtype included; and models built in
mistura (not imported) compute under transformers what they compute here. Configs that no
Hugging Face model type can express are refused, naming the feature, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

import mistura

transformers = pytest.importorskip("transformers")

from mistura.checkpoint import save_model  # noqa: E402
from mistura.convert.hf import from_hf, hf_config, to_hf  # noqa: E402
from mistura.errors import CheckpointError, ConfigError  # noqa: E402
from mistura.model import Transformer  # noqa: E402


def _written_back(saved) -> dict[str, torch.Tensor]:
    """The tensors of a saved Hugging Face folder as export writes them: the same, but for
    interleaved rotary rows (DeepSeek-V3's rope_interleave), whose pairs (2i, 2i + 1) become
    mistura's (i, i + D/2): even rows first, then odd ones."""
    tensors = load_file(saved.folder / "model.safetensors")
    config = saved.hf_model.config
    if not getattr(config, "rope_interleave", False):
        return tensors
    nope, rope, rank = config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
    for name, tensor in tensors.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            heads = tensor.view(config.num_attention_heads, nope + rope, -1)  # (H, D_nope + D_rope, in)
            rotary = heads[:, nope:]
            tensors[name] = torch.cat((heads[:, :nope], rotary[:, 0::2], rotary[:, 1::2]), dim=1).view_as(tensor)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            rotary = tensor[rank:]
            tensors[name] = torch.cat((tensor[:rank], rotary[0::2], rotary[1::2]))
    return tensors


@torch.no_grad()
def test_export_gives_back_the_hugging_face_model(saved, tmp_path, make_ids, assert_same_tensors):
    """Hugging Face -> mistura -> Hugging Face, as the original model type: the same folder, tensor for tensor."""
    model_type = saved.hf_model.config.model_type
    out = to_hf(saved.checkpoint, tmp_path / "hf", model_type=model_type)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["dtype"] == "float32"
    assert config["architectures"] == [type(saved.hf_model).__name__]
    assert_same_tensors(load_file(out / "model.safetensors"), _written_back(saved))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(saved.hf_model)
    ids = make_ids(2, 32)
    torch.testing.assert_close(reloaded(ids).logits, saved.hf_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_round_trip_is_bit_exact(saved, tmp_path, stored_tensors, assert_same_tensors):
    """mistura -> Hugging Face (the model type the architecture calls for) -> mistura."""
    back = from_hf(to_hf(saved.checkpoint, tmp_path / "hf"), tmp_path / "back")
    assert_same_tensors(stored_tensors(back), stored_tensors(saved.checkpoint))
    config, expected = (json.loads((ckpt / "config.json").read_text()) for ckpt in (back, saved.checkpoint))
    assert dict(config, name=None) == dict(expected, name=None)  # the name tells the model type imported


def test_round_trip_keeps_bf16(saved_case, tmp_path, stored_tensors, assert_same_tensors):
    ckpt = from_hf(saved_case("qwen2-moe-shared-dense").folder, tmp_path / "bf16", dtype="bf16")
    hf = to_hf(ckpt, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
    assert {tensor.dtype for tensor in load_file(hf / "model.safetensors").values()} == {torch.bfloat16}
    tensors = stored_tensors(ckpt)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    assert_same_tensors(stored_tensors(from_hf(hf, tmp_path / "back")), tensors)


MOE = dict(n_experts=4, top_k=2, d_expert=32)

# Models built in mistura, and the Hugging Face model type each exports to. Training-only
# options (capacity, auxiliary losses, dropout) come along without changing the logits.
NATIVE = {
    "llama-tied": (dict(), "llama"),
    "llama-bias-untied": (dict(bias=True, tie_embeddings=False), "llama"),
    "gpt2": (dict(preset="gpt2-baseline-tiny", resid_dropout=0.1), "gpt2"),
    "gpt2-exact-gelu": (dict(preset="gpt2-baseline-tiny", mlp="gelu", tie_embeddings=False), "gpt2"),
    "qkv-bias": (dict(qkv_bias=True, rope_theta=500000.0), "qwen2"),
    "experts": (dict(moe=dict(MOE, norm_topk=True, capacity_factor=1.25, aux_loss_weight=0.01)), "mixtral"),
    "experts-qk-norm-dense-first": (
        dict(moe=dict(MOE, z_loss_weight=1e-3), qk_norm=True, first_dense_layers=1, n_layer=3),
        "qwen3_moe",
    ),
    "experts-gated-shared": (dict(moe=dict(MOE, d_shared=48, shared_gate=True), qkv_bias=True), "qwen2_moe"),
}


@pytest.mark.parametrize("case", sorted(NATIVE))
@torch.no_grad()
def test_mistura_models_run_the_same_in_transformers(case, native, tmp_path, stored_tensors, assert_same_tensors):
    """Same logits under transformers; back in mistura, the same tensors."""
    overrides, model_type = NATIVE[case]
    model = native(**overrides)
    ckpt = save_model(tmp_path / "ckpt", model)
    out = to_hf(ckpt, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reloaded(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
    assert_same_tensors(stored_tensors(from_hf(out, tmp_path / "back")), stored_tensors(ckpt))


def test_an_equivalent_model_type_may_be_chosen(native, tmp_path):
    model = native()
    out = to_hf(save_model(tmp_path / "ckpt", model), tmp_path / "hf", model_type="mistral")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded, transformers.MistralForCausalLM)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_tokenizer_comes_along(tiny, tmp_path):
    vocab = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "oi": 3, "tudo": 4, "bem": 5}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<|pad|>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ckpt = save_model(tmp_path / "ckpt", Transformer(tiny("llama-tiny")), tmp_path / "tokenizer.json")
    out = to_hf(ckpt, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer("oi tudo bem")["input_ids"] == mistura.load_tokenizer(ckpt).encode("oi tudo bem").ids
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (1, 2, 0)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)


@pytest.mark.parametrize(
    "preset, overrides, model_type, culprit",
    [
        ("moc-tiny", dict(layer_mlp=("dense", "moc"), moe=MOE), None, r"'moc', layers \[1\]\) have no Hugging Face"),
        ("llama-tiny", dict(adaptive_norm=True), None, "llama cannot express adaptive_norm=True"),
        ("llama-tiny", dict(logit_softcap=30.0), None, "logit_softcap=30.0"),
        ("seed004-baseline", dict(), None, "norm='layernorm'"),  # LayerNorm with RoPE
        (
            "llama-tiny",
            dict(moe=MOE, first_dense_layers=1),
            None,
            r"mixtral cannot express .*layer_mlp=\['dense', 'moe'\]",
        ),
        ("deepseek-moe-tiny", dict(moe=dict(MOE, scoring="sigmoid")), None, "moe.scoring='sigmoid'"),
        ("llama-tiny", dict(yarn=dict(factor=2.0, original_max_seq_len=16)), None, "yarn="),
        ("llama-tiny", dict(bias=True), "mistral", "mistral cannot express bias=True"),
        ("llama-tiny", dict(), "mixtral", "mixtral has experts; this config has none"),
        ("llama-tiny", dict(), "bert", "'bert' is not supported"),
        ("gpt2-baseline-tiny", dict(n_kv_head=2), None, "gpt2 cannot express n_kv_head=2"),
    ],
)
def test_what_hugging_face_cannot_express_is_refused(tiny, preset, overrides, model_type, culprit):
    with pytest.raises(ConfigError, match=culprit):
        hf_config(tiny(preset, **overrides), model_type)


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (dict(layer_mlp=("moc", "moc"), moe=MOE), "collaborative experts"),
        (dict(adaptive_norm=True), "adaptive_norm=True"),
    ],
)
def test_refused_export_writes_nothing(tiny, tmp_path, overrides, culprit):
    ckpt = save_model(tmp_path / "ckpt", Transformer(tiny("llama-tiny", **overrides)))
    with pytest.raises(ConfigError, match=culprit):
        to_hf(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_trained_selection_bias_is_refused(tiny, tmp_path):
    """Aux-loss-free balancing leaves a selection bias that Mixtral's router has no tensor for."""
    model = Transformer(tiny("llama-tiny", moe=dict(MOE, balance_bias_rate=0.01, norm_topk=True)))
    model.blocks[1].mlp.router.expert_bias.copy_(torch.tensor([0.01, -0.01, 0.0, 0.0]))
    with pytest.raises(ConfigError, match=r"blocks\.1\.mlp\.router\.expert_bias is not zero"):
        to_hf(save_model(tmp_path / "ckpt", model), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_checkpoint_must_be_mistura_and_output_new(saved_case, tmp_path):
    saved = saved_case("llama-gqa-tied")
    with pytest.raises(CheckpointError, match="already a Hugging Face folder"):
        to_hf(saved.folder, tmp_path / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        to_hf(saved.checkpoint, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_model_type_never_depends_on_the_name(saved_case):
    config = mistura.load(saved_case("mixtral").checkpoint).config
    written = hf_config(dataclasses.replace(config, name="gpt2-small"))
    assert written["model_type"] == "mixtral" and written["num_local_experts"] == 4
