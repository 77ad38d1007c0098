import math

import pytest
import torch

from mistura.cli import main
from mistura.config import ModelConfig
from mistura.errors import ConfigError
from mistura.model import Transformer
from mistura.parallel.memory import GIB, Layout, count_parameters, describe, memory_plan

# Hand-countable: 2 layers of multi-head attention and a GELU MLP of width 4 h, untied, no biases.
#   vocab: tok_emb + lm_head = 2 * 64 * 16 = 2048
#   split: per layer q, k, v, o 4 * 16 * 16 + up, down 2 * 16 * 64 = 3072; 2 layers 6144
#   replicated: two RMSNorms per layer and the final one, 5 * 16 = 80
SMALL = dict(vocab_size=64, max_seq_len=32, n_layer=2, d_model=16, n_head=4, mlp="gelu", d_ff=64)
N = 2048 + 6144 + 80
H, V, L = 16, 64, 2


def small(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def plan_of(config: ModelConfig, **layout):
    return memory_plan(config, Layout(**{"gpus": 1, "seq_len": 8, **layout}))


def test_categories_count_the_small_model_by_hand():
    counts = count_parameters(small())
    assert (counts.experts, counts.vocab, counts.split, counts.replicated) == (0, 2048, 6144, 80)


@pytest.mark.parametrize(
    "preset", ["llama-tiny", "gpt2-baseline-tiny", "qwen-moe-8e-top2", "deepseek-moe-tiny", "dragao-tiny", "moc-tiny"]
)
def test_categories_sum_to_the_models_total(preset):
    config = ModelConfig.from_name(preset)
    with torch.device("meta"):
        total = Transformer(config).parameter_counts()["total"]
    counts = count_parameters(config)
    assert counts.total == total
    assert (counts.experts > 0) == (config.moe is not None)


def test_bytes_per_parameter_fp32_and_mixed_precision():
    fp32 = plan_of(small(), dtype="fp32", data_parallel="ddp")
    assert (fp32.parameters, fp32.gradients, fp32.optimizer) == (4 * N, 4 * N, 8 * N)
    bf16 = plan_of(small(), dtype="bf16", data_parallel="ddp")
    assert (bf16.parameters, bf16.gradients, bf16.optimizer) == (2 * N, 2 * N, 12 * N)


def test_fsdp_divides_the_dense_model_by_the_gpus():
    ddp = plan_of(small(), data_parallel="ddp")
    fsdp = plan_of(small(), gpus=4, data_parallel="fsdp")
    for name in ("parameters", "gradients", "optimizer"):
        assert getattr(fsdp, name) == getattr(ddp, name) / 4
    assert plan_of(small(), gpus=4, data_parallel="ddp").parameters == ddp.parameters


def test_tp_halves_the_split_matrices_and_keeps_the_replicated():
    plan = plan_of(small(), gpus=2, tp=2, dtype="fp32", data_parallel="ddp")
    assert plan.parameters == 4 * (80 + (2048 + 6144) / 2)


def test_ep_splits_only_the_routed_experts():
    config = ModelConfig.from_name("qwen-moe-8e-top2")
    counts = count_parameters(config)
    plan = plan_of(config, gpus=4, ep=4, dtype="fp32", data_parallel="ddp")
    assert plan.parameters == pytest.approx(4 * (counts.total - counts.experts + counts.experts / 4))
    # fsdp shards the experts over dp / ep ranks on top of ep: every GPU holds 1 / G of the model.
    fsdp = plan_of(config, gpus=4, ep=2, dtype="fp32")
    assert fsdp.parameters == pytest.approx(4 * counts.total / 4)


def test_data_parallel_volumes():
    # ddp: all-reduce 2 (n - 1) / n of the gradients; fsdp: 3 (n - 1) / n of the parameters.
    assert plan_of(small(), gpus=4, dtype="fp32", data_parallel="ddp").data_parallel == 2 * 3 / 4 * 4 * N
    assert plan_of(small(), gpus=4, dtype="bf16", data_parallel="fsdp").data_parallel == 3 * 3 / 4 * 2 * N
    assert plan_of(small(), data_parallel="ddp").data_parallel == 0
    # With ep the experts are reduced over the dp / ep ranks holding the same ones.
    config = ModelConfig.from_name("qwen-moe-8e-top2")
    counts = count_parameters(config)
    rest, experts = counts.total - counts.experts, counts.experts / 2
    plan = plan_of(config, gpus=4, ep=2, dtype="fp32", data_parallel="ddp")
    assert plan.data_parallel == pytest.approx(2 * 4 * (3 / 4 * rest + 1 / 2 * experts))


def test_tensor_and_expert_parallel_volumes():
    B, S = 2, 8
    tp = plan_of(small(), gpus=4, tp=2, micro_batch=B, seq_len=S, dtype="bf16")
    assert tp.tensor_parallel == 4 * L * 2 * (1 / 2) * B * S * H * 2
    assert tp.expert_parallel == 0
    config = ModelConfig.from_name("qwen-moe-8e-top2")  # 6 moe layers, top-2, d_model 256
    ep = plan_of(config, gpus=4, ep=4, micro_batch=B, seq_len=S, dtype="bf16")
    assert ep.expert_parallel == 4 * 6 * (3 / 4) * B * S * 2 * 256 * 2
    assert ep.tensor_parallel == 0


def test_activations_korthikanti_34_sbh_scale_linearly_and_shrink_with_checkpointing():
    # GELU MLP of width 4 h and multi-head attention: 34 s b h per layer in 16 bits, plus fp32 logits.
    plan = plan_of(small(), micro_batch=1, seq_len=8)
    assert plan.activations == 8 * (34 * H * L + 4 * V)
    assert plan_of(small(), micro_batch=3, seq_len=8).activations == 3 * plan.activations
    assert plan_of(small(), micro_batch=1, seq_len=16).activations == 2 * plan.activations
    fp32 = plan_of(small(), seq_len=8, dtype="fp32")
    assert fp32.activations == 8 * (2 * 34 * H * L + 4 * V)
    tp = plan_of(small(), gpus=2, tp=2, seq_len=8)
    assert tp.activations == 8 * ((10 + 24 / 2) * H * L + 4 * V / 2)
    recompute = plan_of(small(), seq_len=8, activation_checkpointing=True)
    assert recompute.activations == 8 * (2 * H * L + 34 * H + 4 * V)
    assert recompute.activations < plan.activations


def test_moe_activations_scale_with_top_k():
    one, two = (ModelConfig.from_name("qwen-moe-8e-top2", moe={"n_experts": 8, "top_k": k}) for k in (1, 2))
    d_expert = two.moe.d_expert  # the moe override keeps the defaults' 512
    difference = plan_of(two, seq_len=8).activations - plan_of(one, seq_len=8).activations
    assert difference == 8 * 6 * 2 * (256 + 3 * d_expert)


def test_dragao_671b_on_256_gpus(capsys):
    config = ModelConfig.from_name("dragao-671b")
    layout = Layout(gpus=256, seq_len=4096, ep=8, data_parallel="fsdp", dtype="bf16")
    plan = memory_plan(config, layout)
    assert plan.counts.total > 670e9
    assert plan.parameters + plan.gradients + plan.optimizer == pytest.approx(16 * plan.counts.total / 256, rel=1e-9)
    assert math.isfinite(plan.total) and plan.activations > 0 and plan.expert_parallel > 0
    text = describe(config, layout, plan)
    print(text)
    assert "dragao-671b" in text and "256 GPUs = dp 256 x tp 1, ep 8" in text
    assert f"{plan.total / GIB:.2f}" in text


@pytest.mark.parametrize(
    "config, layout, culprits",
    [
        (small(), dict(gpus=3, tp=2), ["--tp", "--gpus=3"]),
        (small(), dict(gpus=2, ep=2), ["--ep", "custom"]),
        ("qwen-moe-8e-top2", dict(gpus=2, ep=4), ["--ep", "dp"]),
        ("qwen-moe-8e-top2", dict(gpus=3, ep=3), ["--ep", "n_experts=8"]),
        ("moc-tiny", dict(gpus=2, ep=2), ["moc"]),
        ("llama-tiny", dict(gpus=3, tp=3), ["--tp", "n_head=8"]),
        ("llama-tiny", dict(gpus=8, tp=8), ["--tp", "n_kv_head=4"]),
        (small(d_ff=66), dict(gpus=4, tp=4), ["--tp", "d_ff=66"]),
        (small(), dict(gpus=0), ["--gpus"]),
        (small(), dict(gpus=2, tp=0), ["--tp"]),
        (small(), dict(micro_batch=0), ["--micro-batch"]),
        (small(), dict(seq_len=-1), ["--seq-len"]),
        (small(), dict(seq_len=33), ["--seq-len", "max_seq_len=32"]),
        (small(), dict(dtype="fp16"), ["--dtype"]),
    ],
)
def test_bad_layouts_name_the_culprit(config, layout, culprits):
    config = ModelConfig.from_name(config) if isinstance(config, str) else config
    with pytest.raises(ConfigError) as err:
        plan_of(config, **layout)
    assert all(culprit in str(err.value) for culprit in culprits)


def test_cli_prints_the_table(capsys):
    assert main(["plan", "--memory", "deepseek-moe-tiny", "--gpus", "4", "--tp", "2", "--ep", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 GPUs = dp 2 x tp 2, ep 2; fsdp, bf16; micro-batch 1 x 256 tokens" in out
    for row in ("parameters", "gradients", "optimizer state", "activations", "total", "expert parallel"):
        assert row in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "llama-tiny", "--gpus", "4", "--tp", "3"], "--tp: 3 does not divide --gpus=4"),
        (["--memory", "no-such-model", "--gpus", "1"], "no-such-model"),
        (["--memory", "llama-tiny"], "--gpus"),
        (["--flops", "1e18", "--gpus", "8"], "--gpus: only applies with --memory"),
    ],
)
def test_cli_refuses_bad_layouts(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
