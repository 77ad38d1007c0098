"""The named model presets: `ModelConfig.from_name("llama-tiny", n_layer=2)` builds one.

A preset is a dict of overrides on top of `ModelConfig`'s defaults (a `moe`, `mla` or
`yarn` entry is the dict of that section), with its source in a comment. This module is
plain data: it imports nothing, and `mistura.config` validates what it holds.
"""

from typing import Any

_GPT2 = dict(mlp="gelu_tanh", norm="layernorm", position="learned", bias=True, tie_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small, the 124M shape: https://huggingface.co/openai-community/gpt2/blob/main/config.json
    "gpt2-small": dict(_GPT2, vocab_size=50257, max_seq_len=1024, n_layer=12, d_model=768, n_head=12),
    # GPT-2 architecture at CPU scale (~5M parameters with an 8k vocabulary).
    "gpt2-baseline-tiny": dict(_GPT2, n_layer=4, d_model=256, n_head=4),
    # Seed 004's dense baseline: GPT-2 with RoPE, pre-LayerNorm, biases and a SwiGLU MLP of
    # hidden width 768, the expert width its Qwen-MoE runs keep for a fair comparison.
    "seed004-baseline": dict(
        norm="layernorm",
        position="rope",
        bias=True,
        tie_embeddings=True,
        mlp="swiglu",
        n_layer=6,
        d_model=256,
        n_head=8,
        d_ff=768,
    ),
    # Llama-style (seed 002): RoPE, RMSNorm, GQA, SwiGLU, no biases; ~4M parameters.
    "llama-tiny": dict(n_layer=4, d_model=256, n_head=8, n_kv_head=4, d_ff=704, tie_embeddings=True),
}

# Seed 004's Qwen-style MoE runs: the baseline's shape with every MLP replaced by top-k SwiGLU
# experts, a capacity factor and the Switch balance loss (weight 0.01). Expert widths keep the
# active parameters near the baseline's: top-1 experts as wide as its MLP (768), top-2 half as wide.
_SEED004 = PRESETS["seed004-baseline"]
_SWITCH = dict(aux_loss_weight=0.01)
# DeepSeek-V3's routing (seed 000): sigmoid scores renormalised over the selected experts,
# group-limited, auxiliary-loss-free balancing and a small sequence-wise balance loss
# (arXiv:2412.19437). The CPU presets move the balancing bias ten times faster than V3's 0.001.
_V3_ROUTING = dict(scoring="sigmoid", norm_topk=True, seq_aux_loss_weight=1e-4)
# The CPU-scale DeepSeek body and routing shared by deepseek-moe-tiny and dragao-tiny: a dense
# first layer, then 16 fine-grained experts (3 active) in 4 groups (2 eligible per token).
_DEEPSEEK_TINY = dict(n_layer=6, d_model=256, n_head=8, d_ff=768, tie_embeddings=True, first_dense_layers=1)
_DEEPSEEK_TINY_MOE = dict(_V3_ROUTING, n_experts=16, top_k=3, n_groups=4, topk_groups=2, balance_bias_rate=0.01)
PRESETS |= {
    "qwen-moe-4e-top1": dict(_SEED004, moe=dict(_SWITCH, n_experts=4, top_k=1, d_expert=768, capacity_factor=1.0)),
    "qwen-moe-8e-top2": dict(_SEED004, moe=dict(_SWITCH, n_experts=8, top_k=2, d_expert=384, capacity_factor=1.25)),
    "qwen-moe-6e-top1": dict(_SEED004, moe=dict(_SWITCH, n_experts=6, top_k=1, d_expert=768, capacity_factor=1.1)),
    # DeepSeekMoE (seed 000) at CPU scale, Llama-style, with one shared expert.
    "deepseek-moe-tiny": dict(_DEEPSEEK_TINY, n_kv_head=4, moe=dict(_DEEPSEEK_TINY_MOE, d_expert=192, d_shared=192)),
    # Seed 003's collaborative experts (LunarisCodex-MoC) at CPU scale, Llama-style: every
    # MLP is a MoC layer of 4 experts, 2 fused per token. MoC runs all 4 experts for every
    # token: at width 192 they cost what seed 004's dense 768-wide MLP does, and the layer's
    # two attentions 2.7 times as much again (mistura/model/moe/moc.py counts it).
    "moc-tiny": dict(
        n_layer=6,
        d_model=256,
        n_head=8,
        n_kv_head=4,
        tie_embeddings=True,
        layer_mlp=("moc",) * 6,
        moe=dict(n_experts=4, top_k=2, d_expert=192, moc_heads=4, aux_loss_weight=0.01, diversity_loss_weight=0.01),
    ),
}

# DeepSeek-V2/V3 ("dragão", seed 000): MLA attention, DeepSeekMoE layers after a few dense
# ones, YaRN-extended RoPE, RMSNorm eps 1e-6, untied embeddings. Shapes are those of the
# public config.json files; d_shared = n_shared_experts * moe_intermediate_size. Every
# config says max_position_embeddings 163840 (4096 * YaRN factor 40) although DeepSeek
# announces 32K (V2-Lite) and 128K (V2, V3) of usable context; seed 000 asks for 16K
# (16B, 236B) and 128K (671B). The presets keep the configs' value.
_DEEPSEEK = dict(max_seq_len=163840, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=False)
_DEEPSEEK_MLA = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
# V2 and V3 (not V2-Lite) have 128 heads and a query bottleneck of rank 1536.
_DEEPSEEK_LARGE = dict(_DEEPSEEK, n_head=128, mla=dict(_DEEPSEEK_MLA, q_lora_rank=1536))
_DEEPSEEK_V2_YARN = dict(factor=40.0, original_max_seq_len=4096, mscale=0.707, mscale_all_dim=0.707)
# V2's configs train with a sequence-wise balance loss (aux_loss_alpha 0.001, seq_aux true).
_DEEPSEEK_V2_MOE = dict(scoring="softmax", norm_topk=False, seq_aux_loss_weight=0.001)
PRESETS |= {
    # DeepSeek-V2-Lite, 15.7B total / 2.4B active:
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json
    "dragao-16b": dict(
        _DEEPSEEK,
        vocab_size=102400,
        n_layer=27,
        d_model=2048,
        n_head=16,
        d_ff=10944,
        first_dense_layers=1,
        mla=dict(_DEEPSEEK_MLA, q_lora_rank=None),
        moe=dict(_DEEPSEEK_V2_MOE, n_experts=64, top_k=6, d_expert=1408, d_shared=2 * 1408),
        yarn=_DEEPSEEK_V2_YARN,
    ),
    # DeepSeek-V2, 236B total / 21B active: https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json
    # V2 ranks its 8 device groups by their best expert score (topk_method group_limited_greedy);
    # mistura's router ranks groups by the sum of their two best (V3's rule), so routing differs.
    "dragao-236b": dict(
        _DEEPSEEK_LARGE,
        vocab_size=102400,
        n_layer=60,
        d_model=5120,
        d_ff=12288,
        first_dense_layers=1,
        moe=dict(_DEEPSEEK_V2_MOE, n_experts=160, top_k=6, d_expert=1536, d_shared=2 * 1536, n_groups=8)
        | dict(topk_groups=3, route_scale=16.0),
        yarn=_DEEPSEEK_V2_YARN,
    ),
    # DeepSeek-V3, 671B total / 37B active without its multi-token-prediction module:
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
    "dragao-671b": dict(
        _DEEPSEEK_LARGE,
        vocab_size=129280,
        n_layer=61,
        d_model=7168,
        d_ff=18432,
        first_dense_layers=3,
        moe=dict(_V3_ROUTING, n_experts=256, top_k=8, d_expert=2048, d_shared=2048, n_groups=8, topk_groups=4)
        | dict(route_scale=2.5, balance_bias_rate=0.001),
        yarn=dict(factor=40.0, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0),
    ),
    # DeepSeek-V3's architecture at CPU scale: MLA with a query bottleneck, a dense first layer,
    # then 16 fine-grained experts (3 active) in 4 groups (2 eligible per token) plus a shared
    # one, sigmoid scores, auxiliary-loss-free balancing. No YaRN (set model.yarn to extend
    # the context). Embeddings are tied, as in the other CPU presets: at this width an untied
    # head would add a quarter to the model.
    "dragao-tiny": dict(
        _DEEPSEEK_TINY,
        norm_eps=1e-6,
        mla=dict(q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        moe=dict(_DEEPSEEK_TINY_MOE, d_expert=64, d_shared=64),
    ),
}
