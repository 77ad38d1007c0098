"""Where llama.cpp lays a tensor out otherwise than mistura: rotary rows in pairs, and deepseek2's kv_b_proj
in two per-head tensors.

`llama` and `deepseek2` pair rotary channels (2i, 2i + 1), mistura and the Qwen architectures
(i, i + D/2): their rotary query and key rows are permuted (`rotary_rows`), as llama.cpp's own
converter permutes Hugging Face's Llama. `deepseek2` runs latent attention absorbed, as mistura's
`LatentCache` path does, and reads kv_b_proj as attn_k_b for the queries and attn_v_b for the
output (`stored_tensors`, and back `joined_tensor`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mistura.config import ModelConfig
from mistura.convert.families.common import interleaved_rows
from mistura.convert.gguf.names import K_B, KV_B, V_B, T, tensor_name


def llama_rows(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every query and key channel rotates."""
    q, k = (interleaved_rows(heads, 0, config.head_dim) for heads in (config.n_head, config.n_kv_head))
    return {tensor_name(t, kind): r for t, r in ((T.ATTN_Q, q), (T.ATTN_K, k)) for kind in ("weight", "bias")}


def mla_rows(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The last qk_rope_head_dim rows of each query head, and of kv_a_proj (after the latent) the shared key's."""
    mla = config.mla
    query = interleaved_rows(config.n_head, mla.qk_nope_head_dim, mla.qk_rope_head_dim)
    latent = interleaved_rows(1, mla.kv_lora_rank, mla.qk_rope_head_dim)
    return {tensor_name(T.ATTN_Q): query, tensor_name(T.ATTN_Q_B): query, tensor_name(T.ATTN_KV_A_MQA): latent}


def stored_tensors(config: ModelConfig, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The GGUF tensors that hold the mapped tensor `name`: itself, except `deepseek2`'s attn_kv_b.

    llama.cpp's deepseek2 reads kv_b_proj (H * (D_nope + D_v), r) per head as it absorbs it:
    attn_k_b (H, r, D_nope), each head's key rows transposed to take its query into latent
    space, and attn_v_b (H, D_v, r), its value rows. On a meta tensor: the shapes alone.
    """
    if not name.endswith(KV_B):
        return {name: tensor}
    mla = config.mla
    kv = tensor.view(config.n_head, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
    k, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=1)
    return {name.replace(KV_B, K_B): k.transpose(1, 2).contiguous(), name.replace(KV_B, V_B): v.contiguous()}


def joined_tensor(config: ModelConfig, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The inverse of `stored_tensors`: the mapped tensor `name` from the GGUF tensors `read` returns."""
    if not name.endswith(KV_B):
        return read(name)
    k, v = read(name.replace(KV_B, K_B)).transpose(1, 2), read(name.replace(KV_B, V_B))
    return torch.cat((k, v), dim=1).reshape(-1, config.mla.kv_lora_rank)


def joined_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A file's tensor shapes with each pair of attn_k_b and attn_v_b joined back as attn_kv_b."""
    pairs = [name for name in shapes if name.endswith(K_B) and name.replace(K_B, V_B) in shapes]
    parts = set(pairs) | {name.replace(K_B, V_B) for name in pairs}
    kept = {name: shape for name, shape in shapes.items() if name not in parts}

    def meta(name: str) -> torch.Tensor:
        return torch.empty(shapes[name], device="meta")

    joined = (name.replace(K_B, KV_B) for name in pairs)
    return kept | {name: tuple(joined_tensor(config, name, meta).shape) for name in joined}
