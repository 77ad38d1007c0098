"""GGUF export and import (`mistura.convert.gguf`) on tiny models of every supported family.

Each family's checkpoint is a perturbed tiny mistura model with a byte-level BPE tokenizer
trained here on a few Portuguese sentences (300 tokens, the model's 320 embedding rows
padded). Files are read back with the `gguf` package's reader, independently of the code
under test: names, shapes, values (llama's q/k rows permuted as llama.cpp's converter
permutes Hugging Face's; deepseek2's rotary query and key rows interleaved, kv_b_proj split
per head) and metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mistura
import mistura.chat_template
from mistura.checkpoint import checkpoint_directory, save_model, write_model
from mistura.cli import main
from mistura.config import ModelConfig
from mistura.convert.gguf import from_gguf, to_gguf
from mistura.convert.gguf.archs import ARCHS
from mistura.data.tokenizer import load_tokenizer, train_tokenizer
from mistura.errors import CheckpointError, ConfigError
from mistura.model import Transformer

gguf = pytest.importorskip("gguf")

VOCAB, TOKENS = 320, 300
SHAPE = dict(vocab_size=VOCAB, max_seq_len=32, n_layer=2, d_model=32, n_head=4, d_ff=64)
EXPERTS = dict(n_experts=4, top_k=2, d_expert=32)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
# DeepSeek-V3's routing: sigmoid scores, a selection bias, 2 of 4 groups, renormalised and scaled, a shared expert.
DEEPSEEK_MOE = dict(EXPERTS, n_experts=8, d_expert=16, d_shared=32, n_groups=4, topk_groups=2, route_scale=2.5)
# family -> (preset, overrides, llama.cpp architecture)
FAMILIES = {
    "llama": ("llama-tiny", dict(n_kv_head=2, rope_theta=500000.0), "llama"),
    "llama-bias-tied": ("llama-tiny", dict(bias=True, tie_embeddings=True), "llama"),
    "qwen2": ("llama-tiny", dict(qkv_bias=True, n_kv_head=2), "qwen2"),
    "gpt2": ("gpt2-baseline-tiny", {}, "gpt2"),
    "mixtral": ("llama-tiny", dict(n_kv_head=2, moe=dict(EXPERTS, norm_topk=True)), "llama"),
    "qwen2-moe": ("llama-tiny", dict(qkv_bias=True, moe=dict(EXPERTS, d_shared=64, shared_gate=True)), "qwen2moe"),
    "qwen3-moe": ("llama-tiny", dict(qk_norm=True, head_dim=16, moe=dict(EXPERTS, norm_topk=True)), "qwen3moe"),
    "deepseek": (
        "dragao-tiny",
        dict(mla=dict(MLA, q_lora_rank=16), moe=dict(DEEPSEEK_MOE, scoring="sigmoid", norm_topk=True)),
        "deepseek2",
    ),
    # DeepSeek-V2-Lite's queries (no bottleneck) and YaRN; unnormalised, unscaled weights of every group.
    "deepseek-lite": (
        "dragao-tiny",
        dict(
            mla=MLA,
            moe=dict(DEEPSEEK_MOE, scoring="sigmoid", n_groups=1, topk_groups=1, route_scale=1.0),
            yarn=dict(factor=40.0, original_max_seq_len=4096, mscale=0.707, mscale_all_dim=0.707),
        ),
        "deepseek2",
    ),
    "deepseek-dense": ("dragao-tiny", dict(mla=MLA, moe=None), "deepseek2"),
}
TEXT = (
    "Capitu olhou para mim — devagar, com aqueles olhos de ressaca. Não sei se era ação ou coração;\n"
    "em 1899, às 10h30, o preço do pão subiu 15%! Você já viu? “Sim”, disse ele.\n\n"
    "Última linha: maçã, avô, açúcar, ênfase, pôr-do-sol... e 2024."
)
CHAT_TEMPLATE = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
PER_LAYER = {  # the GGUF tensors of layer 0, as llama.cpp names them
    "llama": "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down",
    "qwen2": "attn_norm attn_q attn_q.bias attn_k attn_k.bias attn_v attn_v.bias attn_output ffn_norm ffn_gate "
    "ffn_up ffn_down",
    "gpt2": "attn_norm attn_norm.bias attn_qkv attn_qkv.bias attn_output attn_output.bias ffn_norm ffn_norm.bias "
    "ffn_up ffn_up.bias ffn_down ffn_down.bias",
    "mixtral": "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate_inp ffn_gate_exps ffn_up_exps "
    "ffn_down_exps",
    "qwen2-moe": "attn_norm attn_q attn_q.bias attn_k attn_k.bias attn_v attn_v.bias attn_output ffn_norm "
    "ffn_gate_inp ffn_gate_exps ffn_up_exps ffn_down_exps ffn_gate_inp_shexp ffn_gate_shexp ffn_up_shexp "
    "ffn_down_shexp",
    "qwen3-moe": "attn_norm attn_q attn_q_norm attn_k attn_k_norm attn_v attn_output ffn_norm ffn_gate_inp "
    "ffn_gate_exps ffn_up_exps ffn_down_exps",
    "deepseek": "attn_norm attn_q_a attn_q_a_norm attn_q_b attn_kv_a_mqa attn_kv_a_norm attn_k_b attn_v_b attn_output "
    "ffn_norm ffn_gate ffn_up ffn_down",
    "deepseek-dense": "attn_norm attn_q attn_kv_a_mqa attn_kv_a_norm attn_k_b attn_v_b attn_output ffn_norm ffn_gate "
    "ffn_up ffn_down",
    "deepseek-lite": "attn_norm attn_q attn_kv_a_mqa attn_kv_a_norm attn_k_b attn_v_b attn_output ffn_norm ffn_gate "
    "ffn_up ffn_down",
}
# deepseek2's layer 1, after the dense layer 0: the MLP's tensors (its attention's are layer 0's).
DEEPSEEK_MOE_LAYER = (
    "ffn_gate_inp exp_probs_b.bias ffn_gate_exps ffn_up_exps ffn_down_exps ffn_gate_shexp ffn_up_shexp ffn_down_shexp"
)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer([TEXT] * 4, TOKENS).save(str(path))
    return path


def build(family: str, **extra) -> Transformer:
    preset, overrides, arch = FAMILIES[family]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, **{**SHAPE, **overrides, **extra})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias") and arch == "deepseek2":  # the selection bias only deepseek2 holds
                buffer.add_(0.1 * torch.randn_like(buffer))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_file):
    """checkpoint(family): the family's saved checkpoint, once per module."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_model(tmp_path_factory.mktemp("ckpt") / family, build(family), tokenizer_file)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """exported(family, type): the family's GGUF file of that type, once per module."""
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, kind: str = "f32") -> Path:
        if (family, kind) not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"{family}-{kind}.gguf"
            cache[family, kind] = to_gguf(checkpoint(family), out, type=kind)
        return cache[family, kind]

    return get


def read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}
    return fields, tensors


def interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's permutation of Hugging Face's q/k rows: (i, i + D/2) pairs to (2i, 2i + 1)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def expected_gguf(model: Transformer, family: str) -> dict[str, torch.Tensor]:
    """What each GGUF tensor of layer 0 and the edges must hold, built by hand from the model's state dict."""
    state, config = model.state_dict(), model.config
    arch = FAMILIES[family][2]
    expected = {"token_embd.weight": state["tok_emb.weight"], "output_norm.weight": state["norm.weight"]}
    if not config.tie_embeddings or arch == "qwen2moe":
        expected["output.weight"] = state["lm_head.weight"]
    attn = "blocks.0.attn."
    if arch == "gpt2":
        for kind in ("weight", "bias"):
            expected[f"blk.0.attn_qkv.{kind}"] = torch.cat([state[f"{attn}{p}_proj.{kind}"] for p in "qkv"])
        expected |= {"position_embd.weight": state["pos_emb.weight"], "output_norm.bias": state["norm.bias"]}
        return expected
    if arch == "deepseek2":
        return expected | expected_deepseek2(state, config)
    q, k = state[f"{attn}q_proj.weight"], state[f"{attn}k_proj.weight"]
    if arch == "llama":
        q, k = interleaved(q, config.n_head), interleaved(k, config.n_kv_head)
    expected |= {
        "blk.0.attn_q.weight": q,
        "blk.0.attn_k.weight": k,
        "blk.0.attn_v.weight": state[f"{attn}v_proj.weight"],
    }
    if config.moe is not None:
        expected["blk.0.ffn_gate_exps.weight"] = state["blocks.0.mlp.experts.gate_proj"]
        expected["blk.0.ffn_gate_inp.weight"] = state["blocks.0.mlp.router.gate.weight"]
    else:
        expected["blk.0.ffn_down.weight"] = state["blocks.0.mlp.down_proj.weight"]
    return expected


def expected_deepseek2(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """deepseek2's layer 0 (latent attention, dense MLP) and layer 1's experts: each head's rotary query rows
    and the shared rotary key's interleaved, kv_b_proj split per head into k_b (transposed) and v_b."""
    mla, heads, attn = config.mla, config.n_head, "blocks.0.attn."
    nope, rope, rank = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    q_name, q_proj = ("attn_q", "q_proj") if mla.q_lora_rank is None else ("attn_q_b", "q_b_proj")
    q = state[f"{attn}{q_proj}.weight"].reshape(heads, nope + rope, -1)
    q_rope = interleaved(q[:, nope:].reshape(heads * rope, -1), heads).reshape(heads, rope, -1)
    kv_a = state[f"{attn}kv_a_proj.weight"]
    kv_b = state[f"{attn}kv_b_proj.weight"].reshape(heads, nope + mla.v_head_dim, rank)
    expected = {
        f"blk.0.{q_name}.weight": torch.cat((q[:, :nope], q_rope), dim=1).reshape(heads * (nope + rope), -1),
        "blk.0.attn_kv_a_mqa.weight": torch.cat((kv_a[:rank], interleaved(kv_a[rank:], 1))),
        "blk.0.attn_k_b.weight": kv_b[:, :nope].transpose(1, 2),
        "blk.0.attn_v_b.weight": kv_b[:, nope:],
        "blk.0.attn_output.weight": state[f"{attn}o_proj.weight"],
        "blk.0.ffn_down.weight": state["blocks.0.mlp.down_proj.weight"],
    }
    if mla.q_lora_rank is not None:
        expected["blk.0.attn_q_a.weight"] = state[f"{attn}q_a_proj.weight"]
    if config.moe is None:
        return expected
    return expected | {
        "blk.1.ffn_gate_inp.weight": state["blocks.1.mlp.router.gate.weight"],
        "blk.1.exp_probs_b.bias": state["blocks.1.mlp.router.expert_bias"],
        "blk.1.ffn_gate_exps.weight": state["blocks.1.mlp.experts.gate_proj"],
        "blk.1.ffn_up_shexp.weight": state["blocks.1.mlp.shared.up_proj.weight"],
    }


def expected_keys(config: ModelConfig, arch: str) -> dict:
    """The {arch}.* keys the file must hold, from the config."""
    keys = {
        "context_length": 32,
        "embedding_length": 32,
        "block_count": 2,
        "attention.head_count": 4,
        "attention.head_count_kv": config.n_kv_head,
        "attention.key_length": config.head_dim,
        "vocab_size": VOCAB,
    }
    if arch == "gpt2":
        return keys | {"attention.layer_norm_epsilon": pytest.approx(config.norm_eps), "feed_forward_length": 64}
    keys |= {
        "attention.layer_norm_rms_epsilon": pytest.approx(config.norm_eps),
        "rope.freq_base": pytest.approx(config.rope_theta),
        "rope.dimension_count": config.head_dim,
        "feed_forward_length": config.d_ff,
    }
    if config.moe is not None:
        keys |= {"expert_count": config.moe.n_experts, "expert_used_count": 2}
        keys |= {"expert_feed_forward_length": config.moe.d_expert}
    if arch == "llama" and config.moe is not None:
        keys["feed_forward_length"] = 32
    if arch == "deepseek2":
        keys |= deepseek2_keys(config)
    if config.yarn is not None:  # as llama.cpp's converter writes DeepSeek's: 0.1 x mscale_all_dim
        keys |= {"rope.scaling.type": "yarn", "rope.scaling.factor": pytest.approx(config.yarn.factor)}
        keys |= {"rope.scaling.original_context_length": 4096}
        keys |= {"rope.scaling.yarn_log_multiplier": pytest.approx(0.0707)}
    return keys


def deepseek2_keys(config: ModelConfig) -> dict:
    """Latent attention as one key head of latent + rotary channels, and DeepSeek's routing."""
    mla, moe = config.mla, config.moe
    keys = {
        "attention.head_count_kv": 1,
        "attention.key_length": 16 + 4,
        "attention.value_length": 16,
        "attention.key_length_mla": 8 + 4,
        "attention.value_length_mla": 8,
        "attention.q_lora_rank": mla.q_lora_rank or 0,
        "attention.kv_lora_rank": 16,
        "leading_dense_block_count": 1 if moe is not None else 2,
    }
    if moe is None:
        return keys | {"expert_shared_count": 0, "expert_feed_forward_length": 0}
    keys |= {
        "expert_shared_count": 2,
        "expert_weights_scale": pytest.approx(moe.route_scale),
        "expert_weights_norm": moe.norm_topk,
        "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
    }
    if moe.n_groups > 1:
        keys |= {"expert_group_count": 4, "expert_group_used_count": 2}
    return keys


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_f32_export_holds_every_tensor_and_key(family, checkpoint, exported):
    fields, tensors = read(exported(family))
    model, arch = mistura.load(checkpoint(family)), FAMILIES[family][2]
    config = model.config
    assert fields["general.architecture"] == arch
    layer = {name.removeprefix("blk.0.") for name in tensors if name.startswith("blk.0.")}
    wanted = {
        name if "." in name else f"{name}.weight" for name in PER_LAYER[family.removesuffix("-bias-tied")].split()
    }
    if family == "llama-bias-tied":
        wanted |= {
            f"{name}.bias" for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        }
    assert layer == wanted
    assert {name for name in tensors if not name.startswith("blk.")} == set(expected_gguf(model, family)) - {
        name for name in expected_gguf(model, family) if name.startswith("blk.")
    }
    later = {name.removeprefix("blk.1.") for name in tensors if name.startswith("blk.1.")}
    if arch == "deepseek2" and config.moe is not None:
        mlp = {"ffn_gate", "ffn_up", "ffn_down"}
        wanted = {name for name in wanted if name.removesuffix(".weight") not in mlp}
        wanted |= {name if "." in name else f"{name}.weight" for name in DEEPSEEK_MOE_LAYER.split()}
    assert later == wanted
    known = ARCHS[arch].tensors
    assert all(
        name.rsplit(".", 1)[0].replace("blk.0.", "blk.{i}.").replace("blk.1.", "blk.{i}.") in known for name in tensors
    )
    for name, tensor in expected_gguf(model, family).items():
        assert tensors[name].shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(tensors[name], tensor.numpy(), err_msg=name)
    keys = expected_keys(config, arch)
    assert {key: fields[f"{arch}.{key}"] for key in keys} == keys
    if family == "qwen2-moe":
        assert fields["qwen2moe.expert_shared_feed_forward_length"] == 64
    if family == "deepseek-lite":  # every group eligible: llama.cpp must not limit the choice
        assert "deepseek2.expert_group_count" not in fields


def test_tokenizer_keys(exported, tokenizer_file):
    fields, _ = read(exported("llama"))
    ours = load_tokenizer(tokenizer_file)
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert tokens[:TOKENS] == [ours.id_to_token(i) for i in range(TOKENS)]
    assert tokens[TOKENS:] == [f"[PAD{i}]" for i in range(TOKENS, VOCAB)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3
    assert set(types[3:TOKENS]) == {gguf.TokenType.NORMAL} and set(types[TOKENS:]) == {gguf.TokenType.UNUSED}
    assert len(fields["tokenizer.ggml.merges"]) == TOKENS - 3 - 256
    assert fields["tokenizer.ggml.merges"][0].count(" ") == 1
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.padding_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.parametrize(("kind", "tolerance"), [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 1e-2), ("q4_0", 0.15)])
def test_quantised_exports_dequantise_within_tolerance(kind, tolerance, exported):
    _, f32 = read(exported("mixtral"))
    reader = gguf.GGUFReader(exported("mixtral", kind))
    types = {t.name: t.tensor_type for t in reader.tensors}
    _, tensors = read(exported("mixtral", kind))
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[kind.upper()]
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType[kind.upper()]
    assert types["blk.0.attn_norm.weight"] == types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    for name, tensor in f32.items():
        scale = np.abs(tensor).max()
        assert np.abs(tensors[name] - tensor).max() <= tolerance * scale, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_gives_the_same_logits_and_tokenizer(family, checkpoint, exported, tmp_path):
    back = from_gguf(exported(family), tmp_path / "back")
    ours, theirs = mistura.load(checkpoint(family)), mistura.load(back)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids)).abs().max() <= 1e-5
    tok, tok_back = mistura.load_tokenizer(checkpoint(family)), mistura.load_tokenizer(back)
    assert tok_back.encode(TEXT).ids == tok.encode(TEXT).ids
    assert tok_back.decode(tok_back.encode(TEXT).ids) == TEXT


def test_chat_template_travels(tmp_path, tokenizer_file):
    with checkpoint_directory(tmp_path / "ckpt") as folder:
        write_model(folder, build("qwen2"), tokenizer_file)
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    fields, _ = read(to_gguf(tmp_path / "ckpt", tmp_path / "chat.gguf", type="f32"))
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    back = from_gguf(tmp_path / "chat.gguf", tmp_path / "back")
    assert (back / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    assert mistura.chat_template.load_chat_template(back).source == CHAT_TEMPLATE


@pytest.mark.parametrize(
    ("family", "extra", "message"),
    [
        ("mixtral", dict(layer_mlp=("moc", "moe")), "collaborative experts"),
        ("llama", dict(adaptive_norm=True), "adaptive_norm"),
        ("llama", dict(logit_softcap=30.0), "logit_softcap"),
        ("llama", dict(position="learned"), "n_positions|gpt2|position"),
        ("gpt2", dict(mlp="gelu"), "tanh approximation"),
        ("mixtral", dict(moe=dict(EXPERTS, norm_topk=False)), "norm_topk"),
        ("qwen3-moe", dict(moe=dict(EXPERTS, norm_topk=False)), "qwen3moe renormalises"),
        ("qwen2-moe", dict(layer_mlp=("dense", "moe")), "experts in every layer"),
        ("deepseek", dict(yarn=dict(factor=4.0)), "mscale == mscale_all_dim > 0"),
        ("deepseek", dict(yarn=dict(factor=4.0, mscale=1.0, mscale_all_dim=0.5)), "mscale == mscale_all_dim"),
        ("deepseek", dict(yarn=dict(factor=4.0, mscale=1.0, mscale_all_dim=1.0, beta_fast=16.0)), "beta_fast 32"),
        ("llama", dict(yarn=dict(factor=4.0)), "yarn"),
        ("deepseek", dict(moe=dict(DEEPSEEK_MOE, scoring="sigmoid", d_shared=0)), "always runs shared experts"),
        ("deepseek", dict(moe=dict(DEEPSEEK_MOE, scoring="softmax")), "scoring"),
    ],
)
def test_features_llama_cpp_lacks_are_refused(family, extra, message, tmp_path, tokenizer_file):
    ckpt = save_model(tmp_path / "ckpt", build(family, **extra), tokenizer_file)
    with pytest.raises(ConfigError, match=message):
        to_gguf(ckpt, tmp_path / "out.gguf", type="f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_checkpoint_without_tokenizer_is_refused(tmp_path):
    ckpt = save_model(tmp_path / "ckpt", build("llama"))
    with pytest.raises(CheckpointError, match="tokenizer"):
        to_gguf(ckpt, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_truncated_and_foreign_files_are_refused(exported, tmp_path):
    data = exported("llama").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.gguf").write_text("not a model", encoding="utf-8")
    for name in ("cut.gguf", "text.gguf", "missing.gguf"):
        with pytest.raises(CheckpointError, match="GGUF"):
            from_gguf(tmp_path / name, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_an_unsupported_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="'mamba' is not supported"):
        from_gguf(tmp_path / "mamba.gguf", tmp_path / "out")


def test_cli_round_trip_and_errors(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert main(["convert", "to-gguf", str(checkpoint("qwen2")), str(out), "--type", "q8_0", "--no-progress"]) == 0
    assert main(["convert", "from-gguf", str(out), str(tmp_path / "back")]) == 0
    assert mistura.load(tmp_path / "back").config.qkv_bias
    capsys.readouterr()
    assert main(["convert", "to-gguf", str(tmp_path / "nothing"), str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found") and err.count("\n") == 1
