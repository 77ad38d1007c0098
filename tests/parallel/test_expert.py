"""Expert parallelism on real processes (gloo): a MoE layer split over 2 and 4 ranks must compute, on each rank's
own tokens, what the unsplit layer computes on them, forward and backward, and move the bytes it should.

Every rank builds the same full layer and every rank's batch (same seeds), so it can run the unsplit reference
on all of them. Each rank backpropagates (y * g).sum() + aux.loss with its own upstream gradient g; the expected
gradients are (see mistura/parallel/expert.py): the rank's own reference gradients for its input, router, shared
expert and shared gate, and for its experts their slice of the reference gradients summed over all ranks' batches.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mistura.config import ModelConfig, MoEConfig
from mistura.errors import ConfigError
from mistura.lora import LoRAConfig, apply_lora
from mistura.model import Transformer
from mistura.model.moe import MoELayer
from mistura.parallel.expert import ExpertParallelMoE, comm_bytes, reset_comm_bytes, shard_experts_
from tests.parallel.conftest import NEEDS_GLOO
from tests.parallel.spawn import run_ranks

pytestmark = NEEDS_GLOO

# fp32 throughout. The split layer sums the same products in another order (gate weights applied after the down
# projection, expert gradients summed over ranks by autograd rather than over one batch), so it agrees to rounding,
# relative to each tensor's largest entry (gradients reach ~100, differences ~2e-5): measured ~3e-7, asserted 1e-5.
TOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max() <= TOL * scale, msg


D, B, T = 32, 2, 12  # 24 tokens, 48 assignments per rank
QWEN = {  # softmax top-2 with capacity, a gated shared expert, the Switch balance loss and the z-loss
    "n_experts": 8,
    "top_k": 2,
    "d_expert": 16,
    "norm_topk": True,
    "capacity_factor": 1.0,
    "d_shared": 16,
    "shared_gate": True,
    "aux_loss_weight": 0.01,
    "z_loss_weight": 0.001,
}
DEEPSEEK = {  # sigmoid scores, 4 groups of which 2 are eligible, a shared expert, selection bias, sequence loss
    "n_experts": 8,
    "top_k": 2,
    "d_expert": 16,
    "scoring": "sigmoid",
    "norm_topk": True,
    "route_scale": 2.5,
    "n_groups": 4,
    "topk_groups": 2,
    "d_shared": 32,
    "balance_bias_rate": 0.001,
    "seq_aux_loss_weight": 0.01,
}


def model_config(moe: dict, layer_mlp=("moe",)) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        max_seq_len=T,
        n_layer=len(layer_mlp),
        d_model=D,
        n_head=4,
        layer_mlp=layer_mlp,
        moe=MoEConfig(**moe),
    )


def moe_layer(moe: dict) -> MoELayer:
    """The full layer, the same on every rank, with O(1) random weights: no near-ties in routing."""
    torch.manual_seed(0)
    layer = MoELayer(model_config(moe))
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    return layer


def run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """Output, aux, input gradient and parameter gradients of (y * g).sum() + aux.loss."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    ((y * g).sum() + aux.loss).backward()
    return y.detach(), aux, x.grad, {name: p.grad.clone() for name, p in layer.named_parameters()}


# name: (moe, training). Qwen drops over capacity in training and is dropless in eval; DeepSeek has no capacity.
CASES = {"qwen_capacity": (QWEN, True), "qwen_eval_dropless": (QWEN, False), "deepseek_groups": (DEEPSEEK, True)}


def check_layers(rank: int, world: int) -> None:
    """Every case in one set of processes: starting them is most of the time."""
    for case in CASES:
        check_layer(rank, world, case)


def check_layer(rank: int, world: int, case: str) -> None:
    moe, training = CASES[case]
    full = moe_layer(moe).train(training)
    if world == 4:  # experts 6 and 7 are never selected: the last rank receives no rows, its splits are empty
        full.router.expert_bias[6:] = -100.0
    xs, gs = torch.randn(2, world, B, T, D)  # every rank's batch and upstream gradient
    sharded = shard_experts_(copy.deepcopy(full), world)
    assert isinstance(sharded, ExpertParallelMoE) and sharded.experts.gate_proj.shape[0] == 8 // world, case
    assert all(torch.equal(full.state_dict()[k], v) for k, v in full_state_dict(sharded).items()), case

    kept = []  # rows each expert runs, per rank's batch, after capacity: (E,) each
    full.experts.register_forward_pre_hook(lambda module, args: kept.append(args[1]))
    refs = [run(full, xs[r], gs[r]) for r in range(world)]
    y, aux, x_grad, grads = run(sharded, xs[rank], gs[rank])

    ref_y, ref_aux, ref_x_grad, ref_grads = refs[rank]
    if case == "qwen_capacity":
        assert ref_aux.stats["dropped_fraction"] > 0  # capacity really drops, so a wrong drop would show
    assert_close(y, ref_y, case)
    assert_close(x_grad, ref_x_grad, case)
    assert_close(aux.loss, ref_aux.loss, case)
    assert aux.stats == ref_aux.stats, case
    assert torch.equal(aux.load, sum(ref[1].load for ref in refs)), case  # global: all ranks' assignments
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    for name, grad in grads.items():
        expected = sum(ref[3][name] for ref in refs)[mine] if name.startswith("experts.") else ref_grads[name]
        assert_close(grad, expected, f"{case}: {name}")

    # Bytes: the kept rows of this rank bound for other ranks' experts go out and the rows of other ranks bound
    # for this rank's experts come back, forward; their gradients retrace both, backward.
    counts = torch.stack(kept)  # (world, E) rows per (source rank, expert)
    owner = torch.arange(8) // (8 // world)
    rows = counts[rank, owner != rank].sum() + counts[torch.arange(world) != rank][:, owner == rank].sum()
    assert sharded.comm.forward == sharded.comm.backward == rows * D * 4, case


@pytest.mark.parametrize("world", [2, 4])
def test_split_layer_matches_unsplit(world):
    run_ranks(check_layers, world)


def check_model(rank: int, world: int) -> None:
    """A Transformer with two MoE layers, sharded in place; bytes in closed form: every token picks experts 0 and 1
    (rank 0's), so rank 1 sends all its rows to rank 0 and rank 0 sends as many back."""
    torch.manual_seed(0)
    model = Transformer(model_config(QWEN | {"capacity_factor": None}, ("moe", "moe")))
    for block in model.blocks:
        block.mlp.router.expert_bias[2:] = -100.0
    full = copy.deepcopy(model)
    assert shard_experts_(model, world) is model
    assert [type(block.mlp) for block in model.blocks] == [ExpertParallelMoE] * 2
    assert all(torch.equal(full.state_dict()[k], v) for k, v in full_state_dict(model).items())

    tokens = torch.randint(0, 64, (world, B, T))
    assert_close(model(tokens[rank]), full(tokens[rank]))
    reset_comm_bytes(model)
    model(tokens[rank]).sum().backward()
    layer_bytes = B * T * 2 * D * 4  # N * K rows of D fp32
    assert comm_bytes(model).forward == comm_bytes(model).backward == 2 * layer_bytes

    with pytest.raises(ConfigError, match="process group has 2 ranks"):
        shard_experts_(copy.deepcopy(full), 4)


def test_model_layers_are_sharded_in_place_and_bytes_follow_the_routing():
    run_ranks(check_model, 2)


@pytest.mark.parametrize(
    ("layer_mlp", "moe", "ep", "message"),
    [
        (("moe",), QWEN, 3, "8 routed experts, not divisible by ep=3"),
        (("moc",), QWEN, 2, "collaborative-experts"),
        (("moe",), QWEN, 2, "needs a torch.distributed process group"),
        (("moe",), QWEN, 0, "ep must be >= 1"),
    ],
)
def test_refuses_what_it_cannot_split(layer_mlp, moe, ep, message):
    model = Transformer(model_config(moe, layer_mlp))
    with pytest.raises(ConfigError, match=message):
        shard_experts_(model, ep)


def test_refuses_experts_already_adapted():
    model = apply_lora(Transformer(model_config(QWEN)), LoRAConfig(rank=2, alpha=4, targets=("experts",)))
    with pytest.raises(ConfigError, match="LoRAExperts, not plain GroupedExperts"):
        shard_experts_(model, 2)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsplit model's state dict, on every rank: each expert-parallel layer's experts gathered whole."""
    state = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, ExpertParallelMoE):
            for key, part in layer.experts.named_parameters():
                parts = [torch.empty_like(part) for _ in range(layer.ep)]
                dist.all_gather(parts, part.detach().contiguous(), group=layer.group)
                state[".".join(filter(None, (name, "experts", key)))] = torch.cat(parts)
    return state
