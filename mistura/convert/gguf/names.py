"""GGUF tensor names, and the tables from them to mistura's names that each llama.cpp architecture reads.

Each table maps GGUF names to mistura names (`mapping.Names`, `{i}` for the layer), read by
`mapping.TensorMap` as the Hugging Face tables are. GGUF names come from the `gguf` package's own
table (`gguf.TENSOR_NAMES`). A GGUF tensor's numpy shape is PyTorch's (out, in): nothing is
transposed. Experts are stacked on both sides, (E, out, in).
"""

from __future__ import annotations

import gguf

from mistura.convert.mapping import Names

T = gguf.MODEL_TENSOR


def tensor_name(tensor: gguf.MODEL_TENSOR, suffix: str = "weight") -> str:
    """A GGUF tensor name, `{i}` for the layer: tensor_name(T.ATTN_Q, "bias") == "blk.{i}.attn_q.bias"."""
    return f"{gguf.TENSOR_NAMES[tensor].format(bid='{i}')}.{suffix}"


def weight_and_bias(tensor: gguf.MODEL_TENSOR, ours: str) -> dict[str, str]:
    """A linear or norm's weight and bias; the bias only matches a model that has one."""
    return {tensor_name(tensor, kind): f"{ours}.{kind}" for kind in ("weight", "bias")}


EDGES: Names = {
    tensor_name(T.TOKEN_EMBD): "tok_emb.weight",
    tensor_name(T.OUTPUT_NORM): "norm.weight",
    tensor_name(T.OUTPUT): "lm_head.weight",
}

NORMS: Names = {
    tensor_name(T.ATTN_NORM): "blocks.{i}.attn_norm.weight",
    tensor_name(T.FFN_NORM): "blocks.{i}.mlp_norm.weight",
}

# Llama's attention and norms; the biases and q/k norms only match the models that have them.
LLAMA_BODY: Names = (
    EDGES
    | NORMS
    | weight_and_bias(T.ATTN_Q, "blocks.{i}.attn.q_proj")
    | weight_and_bias(T.ATTN_K, "blocks.{i}.attn.k_proj")
    | weight_and_bias(T.ATTN_V, "blocks.{i}.attn.v_proj")
    | weight_and_bias(T.ATTN_OUT, "blocks.{i}.attn.o_proj")
    | {
        tensor_name(T.ATTN_Q_NORM): "blocks.{i}.attn.q_norm.weight",
        tensor_name(T.ATTN_K_NORM): "blocks.{i}.attn.k_norm.weight",
    }
)

SWIGLU: Names = (
    weight_and_bias(T.FFN_GATE, "blocks.{i}.mlp.gate_proj")
    | weight_and_bias(T.FFN_UP, "blocks.{i}.mlp.up_proj")
    | weight_and_bias(T.FFN_DOWN, "blocks.{i}.mlp.down_proj")
)

EXPERTS: Names = {
    tensor_name(T.FFN_GATE_INP): "blocks.{i}.mlp.router.gate.weight",
    tensor_name(T.FFN_GATE_EXP): "blocks.{i}.mlp.experts.gate_proj",  # (E, d_expert, d_model)
    tensor_name(T.FFN_UP_EXP): "blocks.{i}.mlp.experts.up_proj",
    tensor_name(T.FFN_DOWN_EXP): "blocks.{i}.mlp.experts.down_proj",  # (E, d_model, d_expert)
}

SHARED_SWIGLU: Names = {
    tensor_name(T.FFN_GATE_SHEXP): "blocks.{i}.mlp.shared.gate_proj.weight",
    tensor_name(T.FFN_UP_SHEXP): "blocks.{i}.mlp.shared.up_proj.weight",
    tensor_name(T.FFN_DOWN_SHEXP): "blocks.{i}.mlp.shared.down_proj.weight",
}
SHARED_EXPERT: Names = {tensor_name(T.FFN_GATE_INP_SHEXP): "blocks.{i}.mlp.shared_gate.weight"} | SHARED_SWIGLU

# DeepSeek-V2/V3: latent attention (queries from q_proj, or through the q_a/q_b bottleneck; only the
# path the model has matches), dense SwiGLU MLPs first, then routed experts with their selection
# bias and the shared experts as one SwiGLU.
DEEPSEEK2: Names = (
    EDGES
    | NORMS
    | {
        tensor_name(T.ATTN_Q): "blocks.{i}.attn.q_proj.weight",
        tensor_name(T.ATTN_Q_A): "blocks.{i}.attn.q_a_proj.weight",
        tensor_name(T.ATTN_Q_A_NORM): "blocks.{i}.attn.q_a_norm.weight",
        tensor_name(T.ATTN_Q_B): "blocks.{i}.attn.q_b_proj.weight",
        tensor_name(T.ATTN_KV_A_MQA): "blocks.{i}.attn.kv_a_proj.weight",  # (r + D_rope, d_model)
        tensor_name(T.ATTN_KV_A_NORM): "blocks.{i}.attn.kv_a_norm.weight",
        tensor_name(T.ATTN_KV_B): "blocks.{i}.attn.kv_b_proj.weight",  # written as attn_k_b and attn_v_b
        tensor_name(T.ATTN_OUT): "blocks.{i}.attn.o_proj.weight",
        tensor_name(T.FFN_EXP_PROBS_B, "bias"): "blocks.{i}.mlp.router.expert_bias",
    }
    | SWIGLU
    | EXPERTS
    | SHARED_SWIGLU
)
# The name ends that `stored_tensors` splits and `joined_tensor` joins.
KV_B, K_B, V_B = (tensor_name(t).removeprefix("blk.{i}.") for t in (T.ATTN_KV_B, T.ATTN_K_B, T.ATTN_V_B))

GPT2: Names = (
    EDGES
    | {tensor_name(T.POS_EMBD): "pos_emb.weight", tensor_name(T.OUTPUT_NORM, "bias"): "norm.bias"}
    | weight_and_bias(T.ATTN_NORM, "blocks.{i}.attn_norm")
    | {
        tensor_name(T.ATTN_QKV, kind): tuple(f"blocks.{{i}}.attn.{p}_proj.{kind}" for p in "qkv")
        for kind in ("weight", "bias")
    }
    | weight_and_bias(T.ATTN_OUT, "blocks.{i}.attn.o_proj")
    | weight_and_bias(T.FFN_NORM, "blocks.{i}.mlp_norm")
    | weight_and_bias(T.FFN_UP, "blocks.{i}.mlp.up_proj")
    | weight_and_bias(T.FFN_DOWN, "blocks.{i}.mlp.down_proj")
)
